"""Replicated-SGD across processes (gloo on 127.0.0.1) against the single-process run.

Reference: the single-process trainer with :class:`flatminima.optim.ReplicatedSGD` (and
``torch.optim.SGD`` / EntropySGD / SAM for the data-parallel baselines) on the same seeds and
minibatch streams. Real processes, real collectives; processes are forked from this (single
threaded) test process so that a launch costs milliseconds instead of a torch import.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from flatminima.distributed import (
    DistributedReplicatedSGD,
    LaunchError,
    free_port,
    init_distributed,
    launch_local,
    train_distributed,
)
from flatminima.distributed.algorithms import DistributedReplicatedAlgorithm, slice_batch
from flatminima.train import TrainConfig, train

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)

# Forked children are safe while this process runs no OpenMP worker threads.
START = "fork" if torch.get_num_threads() == 1 else "spawn"
ENV = {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
STEPS = 50  # 2 epochs of 25 steps


def cfg_of(**kw: Any) -> TrainConfig:
    """400 training samples, minibatch 16 per model: 25 steps per epoch, 2 epochs."""
    base: dict[str, Any] = dict(
        data="gmm",
        data_kwargs={"dim": 20, "num_train": 400, "num_test": 300},
        model="mlp",
        model_kwargs={"hidden": [16], "batchnorm": True},
        optimizer="rsgd",
        num_replicas=2,
        batch_size=16,
        budget="epochs",
        epochs=2,
        lr=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        gamma=0.3,
        gamma_growth=10.0,
        lr_schedule="cosine",
        progress=False,
        train_eval_samples=100,
        seed=3,
    )
    base.update(kw)
    return TrainConfig.from_dict(base)


def _worker(jobs: list[tuple[TrainConfig, str, int, Any]], timeout: float) -> list[Any]:
    """Run ``train_distributed`` for each job in one process group.

    A job's last item ``(rank, step, kind)`` makes that rank exit (``kind="exit"``) or stop
    answering (``"hang"``) at its ``step``-th optimizer step; ``None``: no fault.
    """
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
    out = []
    for cfg, folder, per_replica, fault in jobs:
        if fault is not None and dist.get_rank() == fault[0] % dist.get_world_size():
            _inject_fault(fault[1], fault[2])
        out.append(train_distributed(cfg, folder, procs_per_replica=per_replica, timeout=timeout))
    dist.destroy_process_group()
    return out


def _inject_fault(at_step: int, kind: str) -> None:
    step = DistributedReplicatedAlgorithm.step
    calls = [0]

    def faulty_step(self: Any, next_batch: Any) -> float:
        calls[0] += 1
        if calls[0] == at_step:
            if kind == "exit":
                os._exit(17)  # no cleanup, like a crash or an OOM kill
            time.sleep(3600)  # alive but unresponsive, like a hung GPU
        return step(self, next_batch)

    DistributedReplicatedAlgorithm.step = faulty_step  # type: ignore[method-assign]


def _launch(nprocs: int, jobs: list[Any], timeout: float = 60.0, **kw: Any) -> list[Any]:
    return launch_local(
        nprocs, _worker, (jobs, timeout), env=ENV, start_method=START, timeout=240, **kw
    )


def _single_params(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "checkpoint.pt", weights_only=False)["algorithm"]["model"]


def _rank_params(folder: Path, rank: int) -> dict[str, torch.Tensor]:
    ckpt = torch.load(folder / "checkpoint.pt", weights_only=False)
    return ckpt["ranks"][rank]["algorithm"]["model"]


def assert_replicas_match(
    single: Path, distributed: Path, num_replicas: int, per_replica: int, *, buffers: bool = True
) -> None:
    """Replica ``a`` of the single-process run equals every rank ``a*G + j`` of the other."""
    ref = _single_params(single)
    for a in range(num_replicas):
        for j in range(per_replica):
            got = _rank_params(distributed, a * per_replica + j)
            for name, value in got.items():
                if not buffers and ("running" in name or "num_batches" in name):
                    continue
                expect = ref[f"replicas.{a}.{name}"]
                torch.testing.assert_close(
                    value,
                    expect,
                    rtol=1e-5,
                    atol=1e-6,
                    msg=lambda m, n=name, r=a: f"replica {r} {n}: {m}",
                )


def assert_summaries_match(single: dict[str, Any], other: dict[str, Any]) -> None:
    assert other["status"] == "complete"
    assert other["steps"] == single["steps"] == STEPS
    assert other["samples"] == single["samples"]
    for key, value in single["final"].items():
        if key.endswith("_s"):
            continue
        assert other["final"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Single-process references and one 2-process launch running rSGD and the baselines."""
    root = tmp_path_factory.mktemp("two")
    jobs_cfg = {
        "rsgd": cfg_of(),
        "rsgd_fp16": cfg_of(amp="fp16"),  # GradScaler path: average, unscale, couple, step
        "sgd": cfg_of(optimizer="sgd", model_kwargs={"hidden": [16]}, batch_size=8),
        "esgd": cfg_of(
            optimizer="esgd",
            model_kwargs={"hidden": [16]},
            batch_size=8,
            inner_steps=2,
            gamma=1e-3,
            noise=1e-3,
            epochs=4,
        ),
        "sam": cfg_of(optimizer="sam", model_kwargs={"hidden": [16]}, batch_size=8),
    }
    singles = {}
    for name, cfg in jobs_cfg.items():
        ref = cfg if name.startswith("rsgd") else cfg.replace(batch_size=2 * cfg.batch_size)
        singles[name] = train(ref, root / f"single-{name}")
    jobs = [(cfg, str(root / f"dist-{name}"), 1, None) for name, cfg in jobs_cfg.items()]
    t0 = time.monotonic()
    results = _launch(2, jobs)
    return {
        "root": root,
        "single": singles,
        "dist": dict(zip(jobs_cfg, results[0])),
        "others": results[1:],
        "seconds": time.monotonic() - t0,
    }


# ---------------------------------------------------------------------------- equality


def test_rsgd_two_processes_equal_single_process(two_procs: dict[str, Any]) -> None:
    root = two_procs["root"]
    assert_replicas_match(root / "single-rsgd", root / "dist-rsgd", 2, 1)
    assert_summaries_match(two_procs["single"]["rsgd"], two_procs["dist"]["rsgd"])
    assert all(r == [None] * 5 for r in two_procs["others"])  # summaries on rank 0 only
    # the coupling schedule ran to its end (gamma_0 = 0.3 grown 10x), on the same steps
    assert two_procs["dist"]["rsgd"]["final"]["gamma"] == pytest.approx(0.3 * 10.0)


def test_rsgd_fp16_two_processes_equal_single_process(two_procs: dict[str, Any]) -> None:
    root = two_procs["root"]
    assert_replicas_match(root / "single-rsgd_fp16", root / "dist-rsgd_fp16", 2, 1)
    assert_summaries_match(two_procs["single"]["rsgd_fp16"], two_procs["dist"]["rsgd_fp16"])


def test_rsgd_run_folder_written_once(two_procs: dict[str, Any]) -> None:
    folder = two_procs["root"] / "dist-rsgd"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "checkpoint.pt",
        "config.yaml",
        "distributed.json",
        "metrics.csv",
        "run.json",
        "summary.json",
    ]  # no run.lock left behind
    single_csv = (two_procs["root"] / "single-rsgd" / "metrics.csv").read_text().splitlines()
    dist_csv = (folder / "metrics.csv").read_text().splitlines()
    assert dist_csv[0] == single_csv[0] and len(dist_csv) == len(single_csv) == 3


@pytest.mark.parametrize("name", ["sgd", "esgd", "sam"])
def test_data_parallel_baselines_equal_doubled_batch(two_procs: dict[str, Any], name: str) -> None:
    root = two_procs["root"]
    ref = _single_params(root / f"single-{name}")
    for rank in range(2):
        got = _rank_params(root / f"dist-{name}", rank)
        assert got.keys() == ref.keys()
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6)
    single, other = two_procs["single"][name], two_procs["dist"][name]
    assert other["samples"] == single["samples"]
    assert other["final"]["test_error"] == pytest.approx(single["final"]["test_error"])


def test_distributed_run_folder_is_one_run_folder(two_procs: dict[str, Any]) -> None:
    """The one RunFolder: marker of the run's config, status, and the one load_run (a
    data-parallel run loads rank 0's model in one process; an rSGD one is refused clearly)."""
    from flatminima.train.loop import load_run
    from flatminima.train.run_folder import RunFolder, config_hash

    root = two_procs["root"]
    folder = RunFolder(root / "dist-sgd")
    cfg = TrainConfig.from_yaml(folder.file(RunFolder.CONFIG))
    assert folder.marker()["config_hash"] == config_hash(cfg) and folder.is_complete(cfg)
    trainer = load_run(folder.path)
    from flatminima.train import evaluate

    _, err = evaluate(trainer.eval_models()["model"], trainer.data.test)
    assert err == pytest.approx(two_procs["dist"]["sgd"]["final"]["test_error"])
    with pytest.raises(ValueError, match="distributed rSGD checkpoint"):
        load_run(root / "dist-rsgd")


def test_rsgd_three_processes_equal_single_process(tmp_path: Path) -> None:
    cfg = cfg_of(num_replicas=3, coupling_every=2, nesterov=True, bn="recalibrate")
    single = train(cfg, tmp_path / "single")
    (summary, *_), *others = _launch(3, [(cfg, str(tmp_path / "dist"), 1, None)])
    assert_replicas_match(tmp_path / "single", tmp_path / "dist", 3, 1)
    assert_summaries_match(single, summary)
    assert others == [[None], [None]]


def test_two_replicas_of_two_ranks_equal_doubled_batch(tmp_path: Path) -> None:
    # Each rank takes 8 samples; a replica's minibatch is 2 x 8 = the single run's 16. Without
    # BatchNorm, whose batch statistics would be per rank (as with DDP on CPUs).
    cfg = cfg_of(model_kwargs={"hidden": [16]}, batch_size=8)
    single = train(cfg.replace(batch_size=16), tmp_path / "single")
    (summary, *_), *_ = _launch(4, [(cfg, str(tmp_path / "dist"), 2, None)])
    assert_replicas_match(tmp_path / "single", tmp_path / "dist", 2, 2)
    assert_summaries_match(single, summary)


def test_one_replica_is_torch_sgd(tmp_path: Path) -> None:
    # Exact limit y = 1: the coupling vanishes (w = c), so with any gamma rSGD is torch's SGD on
    # the same initialisation and minibatch stream.
    cfg = cfg_of(num_replicas=1, gamma=5.0)
    sgd = train(cfg.replace(optimizer="sgd"), tmp_path / "sgd")
    [summary] = _launch(1, [(cfg, str(tmp_path / "dist"), 1, None)])[0]
    ref = _single_params(tmp_path / "sgd")
    got = _rank_params(tmp_path / "dist", 0)
    assert got.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=0)
    assert summary["final"]["test_error"] == sgd["final"]["test_error"]


# ---------------------------------------------------------------------------- faults


@pytest.mark.parametrize("dead", [1, 0], ids=["rank1-dies", "rank0-dies"])
def test_killed_process_stops_the_others_and_resume_reproduces(
    two_procs: dict[str, Any], tmp_path: Path, dead: int
) -> None:
    cfg = cfg_of()
    folder = tmp_path / "run"
    timeout = 10.0
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as info:
        _launch(
            2,
            [(cfg, str(folder), 1, (dead, 30, "exit"))],
            timeout=timeout,
            terminate_on_failure=False,
        )
    elapsed = time.monotonic() - t0
    err = info.value
    alive = 1 - dead
    assert err.exitcodes[dead] == 17 and err.exitcodes[alive] == 1  # the survivor failed too
    assert "DistributedError" in err.errors[alive]
    assert "rerun the same command" in err.errors[alive]
    assert elapsed < timeout + 20
    # the epoch-1 checkpoint survived; no summary was written
    assert (folder / "checkpoint.pt").is_file() and not (folder / "summary.json").exists()
    ckpt = torch.load(folder / "checkpoint.pt", weights_only=False)
    assert [s["step"] for s in ckpt["ranks"]] == [25, 25]
    [summary], _ = _launch(2, [(cfg, str(folder), 1, None)])
    assert_replicas_match(two_procs["root"] / "single-rsgd", folder, 2, 1)
    assert_summaries_match(two_procs["single"]["rsgd"], summary)


def test_hung_process_times_out_the_others(tmp_path: Path) -> None:
    timeout = 3.0
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as info:
        _launch(2, [(cfg_of(), str(tmp_path / "run"), 1, (1, 30, "hang"))], timeout=timeout)
    elapsed = time.monotonic() - t0
    assert info.value.exitcodes[0] == 1  # rank 0 gave up; the launcher then stopped rank 1
    assert "DistributedError" in info.value.errors[0]
    assert f"within {timeout:g} s" in info.value.errors[0]
    assert timeout <= elapsed < timeout + 20


def test_resume_with_another_layout_is_refused(two_procs: dict[str, Any], tmp_path: Path) -> None:
    folder = tmp_path / "run"
    shutil.copytree(two_procs["root"] / "dist-rsgd", folder)
    (folder / "summary.json").unlink()
    cfg = cfg_of(batch_size=8)  # the same config (16 per replica), but a 2 x 2 layout
    with pytest.raises(LaunchError) as info:
        # every rank must refuse on its own: let all of them finish rather than terminating
        # the rest at the first failure (which raced with their writing the error report)
        _launch(4, [(cfg, str(folder), 2, None)], terminate_on_failure=False)
    assert all("ResumeMismatchError" in text for text in info.value.errors.values())
    assert set(info.value.errors) == {0, 1, 2, 3}


def test_locked_run_folder_is_refused_on_every_rank(tmp_path: Path) -> None:
    from flatminima.train.run_folder import RunFolder

    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    folder.lock.acquire()  # another writer (this test process) holds the folder
    try:
        with pytest.raises(LaunchError) as info:
            _launch(2, [(cfg_of(), str(folder.path), 1, None)], terminate_on_failure=False)
    finally:
        folder.close()
    errors = info.value.errors
    assert set(errors) == {0, 1}
    assert all(f"being written by pid {os.getpid()}" in text for text in errors.values())
    assert "RunFolderLocked" in errors[0] and "main process could not start" in errors[1]
    assert sorted(p.name for p in folder.path.iterdir()) == []  # nothing written


# ---------------------------------------------------------------------------- validation


def test_world_size_must_be_replicas_times_procs(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {
        "RANK": "0",
        "WORLD_SIZE": "3",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(
        ValueError,
        match=r"World size 3 .*num_replicas \(2\) x procs_per_replica"
        r" \(1\)",
    ):
        train_distributed(cfg_of(), None)
    with pytest.raises(ValueError, match="applies to rsgd only"):
        train_distributed(cfg_of(optimizer="sgd"), None, procs_per_replica=2)
    with pytest.raises(ValueError, match="Invalid timeout"):
        init_distributed(3, timeout=0)
    assert not dist.is_initialized()


def test_missing_launcher_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        init_distributed(2)


def _raise_on_rank_one() -> int:
    rank = int(os.environ["RANK"])
    if rank == 1:
        raise KeyError("boom")
    return rank * 10


def test_launch_local_results_and_errors() -> None:
    assert launch_local(3, int, ("7",), start_method=START) == [7, 7, 7]
    with pytest.raises(LaunchError) as info:
        launch_local(2, _raise_on_rank_one, start_method=START)
    assert info.value.exitcodes[1] == 1 and "KeyError: 'boom'" in info.value.errors[1]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="Invalid nprocs"):
            launch_local(bad, int)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Invalid start_method"):
        launch_local(1, int, start_method="thread")


def test_slice_batch() -> None:
    x, y = torch.arange(12).view(6, 2), torch.arange(6)
    xs, ys = slice_batch((x, y), 1, 3)
    assert ys.tolist() == [2, 3] and xs.tolist() == [[4, 5], [6, 7]]
    with pytest.raises(ValueError, match="cannot be split into 4"):
        slice_batch((x, y), 0, 4)


def test_optimizer_needs_a_process_group() -> None:
    with pytest.raises(RuntimeError, match="initialised torch.distributed"):
        DistributedReplicatedSGD([torch.zeros(2, requires_grad=True)], lr=0.1, gamma=0.1)


# ---------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_torchrun_end_to_end(tmp_path: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.is_file():
        pytest.skip("torchrun not found next to the interpreter")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    cmd = [
        str(torchrun),
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        "-m",
        "flatminima",
        "train",
        "--distributed",
        "--optimizer",
        "rsgd",
        "--num-replicas",
        "2",
        "--data",
        "gmm",
        "--data-kwargs",
        "num_train=400,num_test=300,dim=20",
        "--model",
        "mlp",
        "--model-kwargs",
        "hidden=16",
        "--batch-size",
        "16",
        "--budget",
        "epochs",
        "--epochs",
        "1",
        "--no-progress",
        "--dist-timeout",
        "60",
        "--out",
        str(out),
    ]
    env = {**os.environ, **ENV}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "centre of the replicas" in proc.stdout
    assert (out / "summary.json").is_file() and (out / "distributed.json").is_file()
    single = train(TrainConfig.from_yaml(out / "config.yaml"), tmp_path / "single")
    assert_replicas_match(tmp_path / "single", out, 2, 1)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["test_error"] == pytest.approx(single["final"]["test_error"])
