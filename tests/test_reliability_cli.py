"""Every error is one line (issue 16, items 1, 7, 8): ``flatminima.cli.main`` called in-process.

Training, comparing and studying are replaced by stubs that only build the configurations, so
each case runs in milliseconds; one test trains for real to show the issue's first command works.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from flatminima import cli
from flatminima.train.config import TrainConfig
from flatminima.train.loop import train as REAL_TRAIN

SEEN: list[TrainConfig] = []


def fake_train(cfg, out, **kwargs):
    SEEN.append(cfg)
    return {"final": {"eval_point": 1, "test_error": 0.5}, "samples": 10}


@pytest.fixture(autouse=True)
def _stubs(monkeypatch, tmp_path):
    """No training, no network, internal-error traces into tmp_path."""
    import flatminima.data.download as dl
    from flatminima.commands import train as train_cmd

    SEEN.clear()
    monkeypatch.setattr(train_cmd, "train", fake_train)
    monkeypatch.setattr(train_cmd, "train_distributed", fake_train)

    def no_network(url, dest, timeout, progress=None):
        if not url.startswith("file:"):
            raise OSError(errno.ENETUNREACH, "Network is unreachable (test)", url)
        return real_fetch(url, dest, timeout, progress)

    real_fetch = dl._fetch
    monkeypatch.setattr(dl, "_fetch", no_network)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.chdir(tmp_path)


def run(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` -> (exit status, stdout, stderr); SystemExit counts as a return."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return rc, out.getvalue(), err.getvalue()


def assert_one_line_error(argv: list[str], *words: str, rc: int = 1) -> str:
    code, _, err = run(argv)
    assert code == rc, (argv, code, err)
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0], (argv, err)
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


T = ["train", "--data", "digits", "--model", "mlp", "--epochs", "1", "--no-progress"]


# ----------------------------------------------------------------------- values reach the config


def test_issue_command_gamma_max_1e3_reaches_the_config():
    rc, out, err = run([*T, "--optimizer", "rsgd", "--gamma-max", "1e-3", "--out", "r"])
    assert rc == 0, err
    assert SEEN[-1].gamma_max == 1e-3 and SEEN[-1].optimizer == "rsgd"


def test_set_and_flags_and_config_file_agree(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 1e-3\nflatness_sigmas: 0.1,0.2\n")
    for argv in (
        [*T, "--lr", "1e-3", "--flatness-sigmas", "0.1,0.2"],
        [*T, "--set", "lr=1e-3", "--set", "flatness_sigmas=0.1,0.2"],
        [*T, "--set", "flatness-sigmas=[0.1, 0.2]", "--lr", "1E-3"],
        [*T, "--config", str(tmp_path / "c.yaml")],
    ):
        rc, _, err = run([*argv, "--out", "r"])
        assert rc == 0, (argv, err)
        assert SEEN[-1].lr == 1e-3 and SEEN[-1].flatness_sigmas == [0.1, 0.2], argv


def test_set_wins_over_flag_and_flag_over_config_file(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 0.3\nseed: 4\n")
    rc, _, _ = run([*T, "--config", "c.yaml", "--lr", "0.2", "--set", "lr=0.1", "--out", "r"])
    assert rc == 0 and SEEN[-1].lr == 0.1 and SEEN[-1].seed == 4


@pytest.mark.slow
def test_issue_command_trains_for_real(tmp_path, monkeypatch):
    from flatminima.commands import train as train_cmd

    monkeypatch.setattr(train_cmd, "train", REAL_TRAIN)
    rc, out, err = run(
        [*T, "--optimizer", "rsgd", "--gamma-max", "1e-3", "--train-subset", "200",
         "--set", "flatness_sigmas=0.1,0.2", "--out", str(tmp_path / "real")]
    )  # fmt: skip
    assert rc == 0, err
    assert "test error" in out


# ----------------------------------------------------------------------- one-line errors


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--set", "momentum=true"], ["momentum", "boolean"]),
        (["--lr", "abc"], ["lr", "'abc'"]),
        (["--lr", "nan"], ["lr", "not finite"]),
        (["--seed", "99999999999999999999"], ["seed", "4294967295"]),
        (["--optimizer", "rsgd", "--gamma-growth", "1e300"], ["gamma_growth", "float32"]),
        (["--set", "foo=1"], ["Unknown config key 'foo'"]),
        (["--set", "lr"], ["KEY=VALUE"]),
        (["--set", "flatness_sigmas=0.1,zz"], ["flatness_sigmas", "'zz'"]),
        (["--model-kwargs", "{width: ["], ["model_kwargs", "malformed YAML"]),
        (["--config", "missing.yaml"], ["missing.yaml"]),
    ],
)
def test_bad_train_values_one_line(extra, words):
    assert_one_line_error([*T, *extra, "--out", "r"], "flatminima train: error:", *words)
    assert not SEEN  # refused before any work


def test_yaml_config_errors_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("lr: 0.1\nmodel: [mlp\n  width: 3\n")
    (tmp_path / "booly.yaml").write_text("lr: true\n")
    assert_one_line_error([*T, "--config", "bad.yaml"], "bad.yaml:3:", "malformed YAML")
    assert_one_line_error([*T, "--config", "booly.yaml"], "booly.yaml", "lr", "boolean")


def test_compare_malformed_preset_file_one_line(tmp_path):
    (tmp_path / "p.yaml").write_text("common:\n  lr: [0.1\nsgd: {}\n")
    assert_one_line_error(
        ["compare", "--preset-file", "p.yaml", "--out", "c"], "flatminima compare", "p.yaml:"
    )


@pytest.mark.parametrize("target", ["afile", "afile/sub", "/dev/null"])
def test_out_at_a_file_or_dev_null_one_line(tmp_path, target):
    (tmp_path / "afile").write_text("mine")
    what = "not a folder" if "dev" in target else "is a file"
    assert_one_line_error([*T, "--out", target], "--out", what)
    assert (tmp_path / "afile").read_text() == "mine"


@pytest.mark.parametrize(
    "exc,words",
    [
        (OSError(errno.ENOSPC, "No space left on device", "r/checkpoint.pt"), ["disk full", "r/"]),
        (OSError(errno.EROFS, "Read-only file system", "/ro/r"), ["read-only", "/ro/r"]),
        (PermissionError(errno.EACCES, "Permission denied", "/x"), ["Permission denied: /x"]),
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),
         ["disk full"]),
        (RuntimeError("PytorchStreamReader failed reading zip archive:\nfailed finding central"),
         ["PytorchStreamReader"]),
        (EOFError("Ran out of input"), ["Ran out of input"]),
        (MemoryError(), ["out of memory"]),
    ],
)  # fmt: skip
def test_expected_failures_during_a_run_are_one_line(monkeypatch, exc, words):
    from flatminima.commands import train as train_cmd

    def boom(cfg, out, **kwargs):
        raise exc

    monkeypatch.setattr(train_cmd, "train", boom)
    assert_one_line_error([*T, "--out", "r"], "flatminima train: error:", *words)


def test_unexpected_exception_is_internal_error_70_with_trace_file(monkeypatch, tmp_path):
    from flatminima.commands import train as train_cmd

    def bug(cfg, out, **kwargs):
        raise TypeError("'<' not supported between instances of 'str' and 'float'")

    monkeypatch.setattr(train_cmd, "train", bug)
    line = assert_one_line_error([*T, "--out", "r"], "internal error: TypeError", rc=70)
    trace = Path(line.split("full trace in ")[1].split(";")[0])
    assert trace.parent == tmp_path and "Traceback" in trace.read_text()
    assert "not supported" in trace.read_text()


def test_a_bug_while_building_the_parser_is_also_one_line_70(monkeypatch):
    def broken():
        raise AttributeError("module 'x' has no attribute 'y'")

    monkeypatch.setattr(cli, "build_parser", broken)
    assert_one_line_error(["train"], "flatminima: internal error: AttributeError", rc=70)


def test_keyboard_interrupt_is_130(monkeypatch):
    from flatminima.commands import train as train_cmd

    def stop(cfg, out, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cmd, "train", stop)
    assert_one_line_error([*T, "--out", "r"], "interrupted", rc=130)


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--bogus"],
        ["--threads", "0", "train"],
        ["--threads", "x", "train"],
        ["train", "--optimizer"],
        ["compare"],
        ["data", "--frob"],
        ["compare", "--out", "c", "--seeds", "0"],
        ["compare", "--out", "c", "--jobs", "-1"],
        ["compare", "--out", "c", "--sigmas", "0.1,nan"],
        ["tune", "--out", "t", "--optimizer", "sgd", "--grid", "lr=1", "--seeds", "1.5"],
        ["study", "--out", "s", "--grid", "g", "--n-boot", "0"],
    ],
)
def test_usage_errors_are_one_line_exit_2(argv):
    assert_one_line_error(argv, "error:", "--help", rc=2)


# ----------------------------------------------------------------------- help for every flag


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


@pytest.mark.parametrize(
    "command", ["train", "compare", "tune", "study", "data", "flatness", "gmm"]
)
def test_every_flag_has_a_help_text(command):
    sub = _subparsers()[command]
    flags = [a for a in sub._actions if a.option_strings]
    assert len(flags) > 3
    missing = [a.option_strings[0] for a in flags if not (a.help or "").strip()]
    assert not missing, f"{command}: no help for {missing}"
    if command == "train":  # one flag per config key, each explained
        names = {a.dest for a in flags}
        assert {f for f in TrainConfig.__dataclass_fields__} - {"progress"} <= names


# ----------------------------------------------------------------------- property-based

_TEXTS = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=8),
    st.sampled_from(
        ["1e-3", "1E-3", ".5", "5.", "-1", "0", "nan", "inf", "true", "null", "0.1,0.2",
         "[1, 2]", "{a: [", "rsgd", "sgd", "digits", "2.5", "99999999999999999999", "1e300"]
    ),
)  # fmt: skip


def _flags(command: str) -> list[str]:
    sub = _subparsers()[command]
    skip = {"-h", "--help", "--out", "--root", "--download", "--grid", "--preset"}
    return [s for a in sub._actions for s in a.option_strings if s not in skip]


def _argv(command: str, prefix: list[str]) -> st.SearchStrategy[list[str]]:
    flags = _flags(command)
    item = st.one_of(
        st.tuples(st.sampled_from(flags), _TEXTS).map(list),
        st.sampled_from(flags).map(lambda f: [f]),
        st.tuples(
            st.just("--set"),
            st.tuples(st.sampled_from([*TrainConfig.__dataclass_fields__, "bogus"]), _TEXTS).map(
                lambda kv: f"{kv[0]}={kv[1]}"
            ),
        ).map(list),
    )
    return st.lists(item, max_size=4).map(lambda xs: [*prefix, *(t for x in xs for t in x)])


def _check(argv: list[str]) -> None:
    rc, _, err = run(argv)
    event(f"exit {rc}")  # --hypothesis-show-statistics: valid configs and errors both occur
    assert rc != 70, (argv, err)
    assert "Traceback" not in err, (argv, err)
    if rc != 0:
        lines = [ln for ln in err.split("\n") if ln.strip()]
        assert len(lines) == 1, (argv, err)


_FUZZ = settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@_FUZZ
@given(data=st.data())
def test_property_train_cli_valid_config_or_one_error_line(data):
    argv = data.draw(_argv("train", ["train", "--out", "fuzz-run"]))
    SEEN.clear()
    _check(argv)
    for cfg in SEEN:  # whatever reached training is a valid, typed config
        assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.fixture
def _study_stubs(monkeypatch):
    """compare/tune/study build every configuration they would train, then stop (exit 0)."""
    import importlib

    from flatminima.studies.presets import arm_config, parse_grid

    # the command module calls these by the names it imported
    studies_cmd = importlib.import_module("flatminima.commands.studies")

    def fake_compare(out_dir, *, preset=None, optimizers=None, overrides=None, **kw):
        for arm in optimizers or ["sgd", "rsgd"]:
            arm_config(preset, arm, overrides)
        raise SystemExit(0)

    def fake_tune(out_dir, *, optimizer, grid, preset=None, overrides=None, **kw):
        for key, values in parse_grid(grid).items():
            for v in values:
                arm_config(preset, optimizer, overrides, **{key: v})
        raise SystemExit(0)

    def fake_study(out_dir, grid, *, overrides=None, **kw):
        TrainConfig.from_dict(dict(overrides or {}))
        raise SystemExit(0)

    monkeypatch.setattr(studies_cmd, "compare", fake_compare)
    monkeypatch.setattr(studies_cmd, "tune", fake_tune)
    monkeypatch.setattr(studies_cmd, "correlation_study", fake_study)


@_FUZZ
@given(data=st.data())
def test_property_study_clis_valid_or_one_error_line(_study_stubs, data):
    command = data.draw(st.sampled_from(["compare", "tune", "study", "data"]))
    prefix = {
        "compare": ["compare", "--out", "c"],
        "tune": ["tune", "--out", "t", "--optimizer", "sgd", "--grid", "lr=0.1,1e-3"],
        "study": ["study", "--out", "s", "--grid", "nonexistent-grid"],
        "data": ["data", "--root", "no-data-here"],
    }[command]
    _check(data.draw(_argv(command, prefix)))


_YAML_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    _TEXTS,
    st.lists(st.one_of(st.floats(), _TEXTS), max_size=3),
)


@_FUZZ
@given(
    values=st.dictionaries(
        st.one_of(st.sampled_from(sorted(TrainConfig.__dataclass_fields__)), _TEXTS),
        _YAML_VALUES,
        max_size=3,
    ),
    raw=st.one_of(st.none(), _TEXTS, st.sampled_from(["lr: [", "- 1\n- 2", "a: b: c", "\t"])),
)
def test_property_config_files_valid_or_one_error_line(values, raw):
    import yaml

    text = raw if raw is not None else yaml.safe_dump(values)
    Path("fuzz.yaml").write_text(text, encoding="utf-8")
    SEEN.clear()
    _check(["train", "--out", "fuzz-run", "--config", "fuzz.yaml"])


def test_truncated_checkpoint_is_one_line_naming_it(tmp_path, monkeypatch):
    """A real 1-epoch run, its checkpoint cut in half: the error names the file, no traceback."""
    from flatminima.commands import train as train_cmd

    monkeypatch.setattr(train_cmd, "train", REAL_TRAIN)
    run_dir = tmp_path / "ck"
    rc, _, err = run([*T, "--train-subset", "300", "--out", str(run_dir)])
    assert rc == 0, err
    ckpt = run_dir / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    assert_one_line_error(["flatness", str(run_dir)], "flatminima flatness: error:", str(ckpt))
