"""The run folder: reuse rules, lock (real processes), atomic writes, status, data record,
clear messages, the flatness command's refusals, and the trainer leaving global state alone."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from flatminima.train import DivergenceError, ResumeMismatchError, TrainConfig, Trainer, train
from flatminima.train.loop import determinism, load_run
from flatminima.train.run_folder import (
    RunFileError,
    RunFolder,
    RunFolderError,
    RunFolderLocked,
    RunLock,
    config_hash,
)


def small_cfg(**kw) -> TrainConfig:
    base = dict(
        data="gmm",
        data_kwargs={"num_train": 320, "num_test": 100, "dim": 20},
        model="mlp",
        model_kwargs={"hidden": [8]},
        epochs=2,
        batch_size=32,
        lr=0.05,
        progress=False,
        train_eval_samples=100,
    )
    base.update(kw)
    return TrainConfig.from_dict(base)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def train_cmd(out: Path, *extra: str, epochs: int = 12) -> list[str]:
    return [
        sys.executable,
        "-m",
        "flatminima",
        *extra,
        "train",
        "--data",
        "gmm",
        "--model",
        "mlp",
        "--model-kwargs",
        "hidden=16",
        "--data-kwargs",
        "num_train=1280,num_test=200,dim=20",
        "--batch-size",
        "16",
        "--epochs",
        str(epochs),
        "--train-eval-samples",
        "100",
        "--no-progress",
        "--out",
        str(out),
    ]


# ---------------------------------------------------------------------------- reuse rules


def test_marker_records_config_hash_and_a_finished_run_is_skipped(tmp_path):
    cfg = small_cfg()
    summary = train(cfg, tmp_path / "run")
    folder = RunFolder(tmp_path / "run")
    marker = folder.marker()
    assert marker["config_hash"] == config_hash(cfg) == config_hash(small_cfg())
    assert config_hash(cfg.replace(lr=0.1)) != config_hash(cfg)
    assert config_hash(cfg.replace(progress=True)) == config_hash(cfg)  # presentation only
    assert marker["data"] == {"name": "gmm", "source": "synthetic", "files": []}
    assert folder.status() == "complete" and folder.is_finished(cfg) and folder.is_complete(cfg)
    assert not folder.is_finished(cfg.replace(lr=0.1))
    assert not folder.lock.path.exists()  # released
    before = snapshot(tmp_path / "run")
    assert train(cfg, tmp_path / "run")["final"] == summary["final"]
    assert snapshot(tmp_path / "run") == before


def test_copied_run_without_checkpoint_and_another_config_is_refused(tmp_path):
    """Issue case: copy a finished run, delete its checkpoint, train another config on it."""
    cfg = small_cfg()
    train(cfg, tmp_path / "run")
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    (tmp_path / "copy" / "checkpoint.pt").unlink()
    before = snapshot(tmp_path / "copy")
    with pytest.raises(ResumeMismatchError, match=r"differs in: lr\)"):
        train(cfg.replace(lr=0.1), tmp_path / "copy")
    assert snapshot(tmp_path / "copy") == before


def test_a_users_own_files_are_never_overwritten(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "metrics.csv").write_text("a,b\n1,2\n")
    (folder / "summary.json").write_text('{"mine": true}')
    (folder / "config.yaml").write_text("lr: 3\n")
    before = snapshot(folder)
    with pytest.raises(RunFolderError, match="holds no flatminima run") as info:
        train(small_cfg(), folder)
    assert "config.yaml" in str(info.value) and "metrics.csv" in str(info.value)
    assert snapshot(folder) == before and sorted(os.listdir(folder)) == sorted(before)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="not a folder"):
        train(small_cfg(), tmp_path / "file")
    with pytest.raises(RunFolderError, match="/dev/null exists and is not a folder"):
        train(small_cfg(), "/dev/null")


def test_cli_refuses_a_foreign_folder_with_one_line(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "summary.json").write_text("{}")
    proc = subprocess.run(
        train_cmd(folder, epochs=1), env=ENV, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    assert "holds no flatminima run" in proc.stderr and "Traceback" not in proc.stderr
    assert (folder / "summary.json").read_text() == "{}"


def test_folder_written_before_markers_is_adopted_only_for_its_config(tmp_path):
    cfg = small_cfg(epochs=2)
    Trainer(cfg, tmp_path / "old").run(max_eval_points=1)
    (tmp_path / "old" / "run.json").unlink()  # as written by an older version
    shutil.copytree(tmp_path / "old", tmp_path / "old2")
    with pytest.raises(ResumeMismatchError, match="batch_size"):
        train(cfg.replace(batch_size=16), tmp_path / "old")
    assert train(cfg, tmp_path / "old2")["status"] == "complete"  # resumed
    assert RunFolder(tmp_path / "old2").marker()["config_hash"] == config_hash(cfg)


def test_status_of_each_stage(tmp_path):
    cfg = small_cfg(epochs=2)
    folder = RunFolder(tmp_path / "run")
    assert folder.status() == "empty"
    Trainer(cfg, folder.path).run(max_eval_points=1)
    assert folder.status() == "interrupted" and not folder.is_finished(cfg)
    other = RunLock(folder.file(RunFolder.LOCK))
    other.acquire()
    try:
        assert folder.status() == "running"
    finally:
        other.release()
    train(cfg, folder.path)
    assert folder.status() == "complete"
    diverged = RunFolder(tmp_path / "div")
    with pytest.raises(DivergenceError):
        train(small_cfg(lr=1e6), diverged.path)
    assert diverged.status() == "diverged" and diverged.is_finished(small_cfg(lr=1e6))
    assert not diverged.is_complete(small_cfg(lr=1e6))
    with pytest.raises(DivergenceError, match="already diverged: training loss became"):
        train(small_cfg(lr=1e6), diverged.path)


# ---------------------------------------------------------------------------- lock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_refuses_a_live_holder_and_takes_over_stale_ones(tmp_path):
    path = tmp_path / "run.lock"
    first = RunLock(path)
    first.acquire()
    with pytest.raises(RunFolderLocked, match=rf"pid {os.getpid()} on host {socket.gethostname()}"):
        RunLock(path).acquire()
    first.release()
    assert not path.exists()
    host = socket.gethostname()
    path.write_text(json.dumps({"host": host, "pid": _dead_pid(), "token": "x"}))
    second = RunLock(path)
    second.acquire()  # the holder's pid is gone: taken over at once
    assert json.loads(path.read_text())["pid"] == os.getpid()
    second.release()
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "y"}))
    with pytest.raises(RunFolderLocked, match="host elsewhere"):  # fresh heartbeat
        RunLock(path, stale_s=30).acquire()
    old = time.time() - 60
    os.utime(path, (old, old))
    third = RunLock(path, stale_s=30)
    third.acquire()  # another node's holder stopped beating 60 s ago
    third.release()


def test_heartbeat_refreshes_and_a_lost_lock_is_noticed(tmp_path):
    path = tmp_path / "run.lock"
    lock = RunLock(path, heartbeat_s=0.05, stale_s=1.0)
    lock.acquire()
    try:
        old = time.time() - 100
        os.utime(path, (old, old))
        deadline = time.time() + 5
        while time.time() - path.stat().st_mtime > 10 and time.time() < deadline:
            time.sleep(0.02)
        assert time.time() - path.stat().st_mtime < 10  # the heartbeat touched it
        lock.check()
        path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "thief"}))
        with pytest.raises(RunFolderLocked, match="lost the lock"):
            lock.check()
    finally:
        lock.release()
    assert path.exists()  # someone else's lock is left alone
    with pytest.raises(ValueError, match="heartbeat_s"):
        RunLock(path, heartbeat_s=5, stale_s=1)


def test_two_processes_on_one_folder_then_kill_9_and_resume(tmp_path):
    """The second process is refused naming the first; after kill -9 a rerun resumes."""
    out = tmp_path / "run"
    first = subprocess.Popen(
        train_cmd(out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        metrics = out / "metrics.csv"
        deadline = time.time() + 120
        while time.time() < deadline and not (
            (out / "checkpoint.pt").is_file() and len(metrics.read_text().splitlines()) >= 2
        ):
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)  # holds the lock, mid-run, deterministically
        rows_at_kill = metrics.read_text().splitlines()
        assert 2 <= len(rows_at_kill) <= 12, "the first run must be stopped part-way"
        second = subprocess.run(
            train_cmd(out), env=ENV, capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 1, second.stderr
        assert f"being written by pid {first.pid} on host {socket.gethostname()}" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (out / "run.lock").exists() and not (out / "summary.json").exists()
    rerun = subprocess.run(
        train_cmd(out, "-v"), env=ENV, capture_output=True, text=True, timeout=120
    )
    assert rerun.returncode == 0, rerun.stderr
    assert "taking over the stale lock" in rerun.stderr and "resumed" in rerun.stderr
    final = metrics.read_text().splitlines()
    assert len(final) == 13 and [r.split(",")[:8] for r in final[: len(rows_at_kill)]] == [
        r.split(",")[:8] for r in rows_at_kill
    ]
    assert not (out / "run.lock").exists()
    assert json.loads((out / "summary.json").read_text())["status"] == "complete"


def test_ctrl_c_releases_the_lock_and_the_rerun_resumes_exactly(tmp_path):
    cfg = small_cfg(epochs=3)
    full = train(cfg, tmp_path / "full")
    trainer = Trainer(cfg, tmp_path / "run")
    step, calls = trainer.algo.step, []

    def interrupted(next_batch):
        calls.append(1)
        if len(calls) == 15:  # mid-way through epoch 2 (10 steps per epoch)
            raise KeyboardInterrupt
        return step(next_batch)

    trainer.algo.step = interrupted
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert not (tmp_path / "run" / "run.lock").exists()
    assert RunFolder(tmp_path / "run").status() == "interrupted"
    resumed = train(cfg, tmp_path / "run")

    def numbers(rows):
        return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]

    assert numbers([resumed["final"]]) == numbers([full["final"]])
    assert numbers(RunFolder(tmp_path / "run").read_metrics()) == numbers(
        RunFolder(tmp_path / "full").read_metrics()
    )


# ---------------------------------------------------------------------------- files and messages


def test_failed_checkpoint_write_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    cfg = small_cfg(epochs=2)
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.run(max_eval_points=1)
    good = (tmp_path / "run" / "checkpoint.pt").read_bytes()

    def full_disk(obj, fh):
        fh.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(RunFileError, match=r"checkpoint\.pt: .*No space left.*disk full"):
        trainer.run()
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == good
    assert not list((tmp_path / "run").glob("*.tmp"))
    assert not (tmp_path / "run" / "run.lock").exists()


def test_file_size_limit_in_a_real_process_gives_one_line_and_no_temporary(tmp_path):
    """A real write failure (RLIMIT_FSIZE: the OS refuses to grow a file, as on a full disk)."""
    out = tmp_path / "run"

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8_000, 8_000))  # checkpoint: about 13 kB

    proc = subprocess.run(
        train_cmd(out, epochs=1),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit,
    )
    assert proc.returncode == 1, proc.stderr
    assert f"could not write {out / 'checkpoint.pt'}" in proc.stderr
    assert "disk full" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(out.glob("*.tmp")) and not (out / "checkpoint.pt").exists()


def test_truncated_checkpoint_names_the_file(tmp_path):
    cfg = small_cfg(epochs=2)
    Trainer(cfg, tmp_path / "run").run(max_eval_points=1)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(RunFileError, match=rf"{ckpt}.*truncated or corrupt"):
        train(cfg, tmp_path / "run")
    with pytest.raises(RunFileError, match="truncated"):
        load_run(tmp_path / "run")


def test_divergence_before_any_checkpoint_does_not_claim_one(tmp_path):
    with pytest.raises(DivergenceError) as info:
        train(small_cfg(lr=1e6), tmp_path / "run")
    msg = str(info.value)
    assert "no checkpoint was written" in msg and "is kept in" not in msg
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["message"] == msg


# ---------------------------------------------------------------------------- global state


def test_trainer_leaves_the_global_rng_alone_and_keeps_its_numbers(tmp_path):
    cfg = small_cfg(epochs=2, optimizer="esgd", inner_steps=2, noise=1e-3)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    ref = Trainer(cfg, tmp_path / "a")
    assert torch.equal(torch.get_rng_state(), before)
    summary = ref.run()
    assert torch.equal(torch.get_rng_state(), before)
    other = Trainer(cfg, tmp_path / "b")
    torch.rand(1000)  # the caller's randomness between building and running
    assert other.run()["final"]["train_loss"] == summary["final"]["train_loss"]


def test_determinism_is_scoped(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    with determinism(True, torch.device("meta")):  # any accelerator device type
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    with determinism(True, torch.device("cpu")):  # CPU kernels are deterministic already
        assert not torch.are_deterministic_algorithms_enabled()


# ---------------------------------------------------------------------------- data record


def _idx_folder(folder: Path) -> None:
    from flatminima.data import write_idx

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for stem, n in (("train", 300), ("t10k", 100)):
        write_idx(
            folder / f"{stem}-images-idx3-ubyte.gz",
            rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
        )
        write_idx(folder / f"{stem}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))


def test_data_files_are_recorded_and_their_loss_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from flatminima.cli import main

    data = tmp_path / "data" / "fashion-mnist"
    _idx_folder(data)
    (data / "notes.txt").write_text("not data")  # only the files the data layer read count
    monkeypatch.setenv("FLATMINIMA_DATA", str(tmp_path / "data"))
    cfg = small_cfg(data="fashion-mnist", data_kwargs={}, epochs=1, batch_size=50)
    train(cfg, tmp_path / "run")
    files = RunFolder(tmp_path / "run").marker()["data"]["files"]
    assert {Path(f["path"]).name for f in files} == {p.name for p in data.glob("*.gz")}
    for f in files:
        assert f["sha256"] == hashlib.sha256(Path(f["path"]).read_bytes()).hexdigest()
    shutil.rmtree(tmp_path / "data")
    monkeypatch.delenv("FLATMINIMA_DATA")
    assert main(["flatness", str(tmp_path / "run"), "--samples", "50", "--draws", "1"]) == 1
    err = capsys.readouterr().err
    assert "data files that are gone" in err and "TensorLoader" not in err


# ---------------------------------------------------------------------------- flatness command


def _flatness(run: Path, *extra: str) -> int:
    from flatminima.cli import main

    return main(
        ["flatness", str(run), "--sigmas", "0,0.5", "--draws", "2", "--samples", "100", *extra]
    )


def test_flatness_refuses_incomplete_runs_unless_allowed(tmp_path, capsys):
    Trainer(small_cfg(epochs=2), tmp_path / "part").run(max_eval_points=1)
    assert _flatness(tmp_path / "part") == 1
    err = capsys.readouterr().err
    assert "is interrupted" in err and "--allow-incomplete" in err
    assert not (tmp_path / "part" / "flatness").exists()
    with pytest.raises(DivergenceError):
        train(small_cfg(lr=1e6), tmp_path / "div")
    assert _flatness(tmp_path / "div") == 1
    assert "is diverged (training loss became" in capsys.readouterr().err
    assert _flatness(tmp_path / "part", "--allow-incomplete") == 0
    rows = list(csv.DictReader((tmp_path / "part/flatness/local_energy.csv").open()))
    history = torch.load(tmp_path / "part/checkpoint.pt", weights_only=False)["history"]
    assert {r["run_status"] for r in rows} == {"interrupted"}
    assert float(rows[0]["train_error"]) == history[-1]["train_error"]


def test_flatness_csv_has_status_training_error_and_hessian_columns(tmp_path):
    summary = train(small_cfg(), tmp_path / "run")
    assert _flatness(tmp_path / "run", "--hessian", "--hessian-samples", "50") == 0
    out = tmp_path / "run" / "flatness"
    rows = list(csv.DictReader((out / "local_energy.csv").open()))
    hessian = json.loads((out / "hessian.json").read_text())
    for row in rows:
        assert row["run_status"] == "complete"
        assert float(row["train_error"]) == summary["final"]["train_error"]
        assert float(row["hessian_top"]) == hessian["top_eigenvalue"]
        assert float(row["hessian_trace"]) == hessian["trace"]


@pytest.mark.parametrize("flag", ["--samples", "--draws", "--hessian-samples"])
def test_flatness_zero_counts_are_usage_errors(tmp_path, capsys, flag):
    from flatminima.cli import main

    with pytest.raises(SystemExit) as info:
        main(["flatness", str(tmp_path), flag, "0"])
    assert info.value.code == 2
    assert f"argument {flag}: expected an integer >= 1, got 0" in capsys.readouterr().err


def test_every_flatness_flag_has_help():
    from flatminima.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["flatness"]
    missing = [a.dest for a in sub._actions if a.dest != "help" and not a.help]
    assert missing == []


# ---------------------------------------------------------------------------- unit names

OLD_NAMES = {"samples": "grad_evals", "eval_point": "epoch"}


def _old(record: dict) -> dict:
    """A record as versions before the unit names wrote it (samples/eval_point said
    grad_evals/epoch), nested final/early_stopped records included."""
    return {
        OLD_NAMES.get(k, k): _old(v) if k in ("final", "early_stopped") else v
        for k, v in record.items()
    }


def _write_old_metrics(folder: RunFolder) -> None:
    with folder.file(RunFolder.METRICS).open() as fh:
        rows = list(csv.DictReader(fh))
    with folder.file(RunFolder.METRICS).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(_old(rows[0])))
        writer.writeheader()
        writer.writerows(_old(r) for r in rows)


def test_metrics_and_summary_name_their_units(tmp_path):
    cfg = small_cfg(epochs=2, val_size=64)
    summary = train(cfg, tmp_path / "run")
    rows = RunFolder(tmp_path / "run").read_metrics()
    assert [r["eval_point"] for r in rows] == [1.0, 2.0]
    # samples through backward: steps x batch size for SGD (one pass per step)
    assert [r["samples"] for r in rows] == [r["step"] * 32 for r in rows]
    assert summary["samples"] == summary["steps"] * 32 == rows[-1]["samples"]
    assert summary["final"]["eval_point"] == 2 and "eval_point" in summary["early_stopped"]
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert header[:3] == ["eval_point", "step", "samples"] and "data_epochs" in header
    assert written["samples"] == summary["samples"] and written["final"]["eval_point"] == 2
    assert not {"grad_evals", "epoch"} & (set(written) | set(header) | set(written["final"]))


def test_run_folder_with_the_old_names_reads_with_the_new_ones(tmp_path):
    """summary.json, metrics.csv and the checkpoint of a run written with the old key names
    read back with the new names and the same values; an old checkpoint resumes exactly."""
    cfg = small_cfg(epochs=3, val_size=64)
    whole = train(cfg, tmp_path / "whole")
    Trainer(cfg, tmp_path / "part").run(max_eval_points=1)
    part = RunFolder(tmp_path / "part")
    ckpt = part.read_checkpoint()
    ckpt["epoch"] = ckpt.pop("eval_point")
    ckpt["history"] = [_old(r) for r in ckpt["history"]]
    part.save_checkpoint(ckpt)
    _write_old_metrics(part)
    assert "grad_evals" in part.file(RunFolder.METRICS).read_text()
    assert load_run(part.path).eval_point == 1
    resumed = train(cfg, part.path)  # the old checkpoint resumes to the same end
    drop = ("train_time_s", "eval_time_s")
    assert {k: v for k, v in resumed["final"].items() if k not in drop} == {
        k: v for k, v in whole["final"].items() if k not in drop
    }
    assert resumed["samples"] == whole["samples"]
    assert (
        part.read_metrics()[0]["samples"]
        == RunFolder(tmp_path / "whole").read_metrics()[0]["samples"]
    )
    folder = RunFolder(tmp_path / "whole")
    new_summary, new_rows = folder.summary(), folder.read_metrics()
    folder.write_summary(_old(new_summary))
    _write_old_metrics(folder)
    assert "grad_evals" in folder.file(RunFolder.SUMMARY).read_text()
    assert folder.summary() == new_summary
    assert folder.read_metrics() == new_rows
    assert folder.is_complete(cfg)  # and a study skips it as before


def test_measure_run_flatness_is_the_local_energy_of_the_trained_network(tmp_path):
    """The library behind `flatminima flatness`: rows = local_energy of the loaded network."""
    from flatminima.flatness import local_energy
    from flatminima.train.measure import FlatnessOptions, check_runs, measure_run_flatness

    run = tmp_path / "run"
    train(small_cfg(epochs=1), run)
    assert check_runs([run], allow_incomplete=False) == {run: "complete"}
    opts = FlatnessOptions(sigmas=(0.0, 0.3), draws=2, samples=64, seed=1, out=tmp_path / "out")
    rows = measure_run_flatness(run, "complete", opts)
    trainer = load_run(run)
    model = next(iter(trainer.eval_models().values()))
    data = (trainer.data.train.x[:64], trainer.data.train.y[:64])
    ref = local_energy(model, data, [0.0, 0.3], n_draws=2, seed=1).to_rows()
    assert [{k: r[k] for k in ref[0]} for r in rows] == ref
    assert rows[0]["delta_error"] == 0.0 and rows[0]["run_status"] == "complete"
    assert rows[0]["train_error"] == trainer.history[-1]["train_error"]
    written = list(csv.DictReader((tmp_path / "out" / "run" / "local_energy.csv").open()))
    assert len(written) == 2 and not (run / "flatness").exists()
