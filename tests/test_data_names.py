"""Data found however it is named (issue 16, item 2).

IDX files under the names mirrors ship them with, corrupt files named in the error, a folder the
user named never replaced by another one, and ``flatminima data --download`` over file:// URLs.
The IDX bytes are written by an independent encoder (the published layout), not by write_idx.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import itertools

import numpy as np
import pytest

import flatminima.data.download as dl
from flatminima.data import (
    DatasetNotFoundError,
    find_idx_files,
    load_dataset,
    locate_dataset,
    sources,
)
from flatminima.data import datasets as ds_mod

STEMS = sources.IDX_FILES


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.delenv("FLATMINIMA_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(sources, "SYSTEM_DIRS", {})

    def no_network(url, dest, timeout, progress=None):
        if not url.startswith("file:"):
            raise AssertionError(f"test tried to reach the network: {url}")
        return real_fetch(url, dest, timeout, progress)

    real_fetch = dl._fetch
    monkeypatch.setattr(dl, "_fetch", no_network)


def idx_bytes(arr: np.ndarray, code: int) -> bytes:
    """0x00 0x00 code ndim, big-endian uint32 sizes, big-endian payload (LeCun's layout)."""
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def arrays(n_train=6, n_test=4, seed=0):
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_train, dtype=np.uint8),
        rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_test, dtype=np.uint8),
    ]


def write_set(folder, names=None, gz=False, data=None):
    """Write the four files under ``names`` (default: the standard stems)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = data or arrays()
    paths = []
    for arr, name in zip(data, names or STEMS, strict=True):
        blob = idx_bytes(arr, 0x08)
        path = folder / (name + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(blob) if gz else blob)
        paths.append(path)
    return data, paths


def variant(stem: str, dot: bool, case: str) -> str:
    name = stem.replace("-idx", ".idx") if dot else stem
    return {"lower": name, "upper": name.upper(), "title": name.title()}[case]


# ----------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "dot,gz,case,sub",
    [
        (dot, gz, case, sub)
        for dot, gz, case, sub in itertools.product(
            (False, True), (False, True), ("lower", "upper", "title"), (".", "raw")
        )
        # every option at least once, without the full 24-way product
        if (dot + gz + (case != "lower") + (sub == "raw")) % 2 == 0 or case == "title"
    ],
)
def test_mirror_name_variants_are_found_and_read(tmp_path, dot, gz, case, sub):
    root = tmp_path / "data"
    folder = root / "mnist" / sub if sub != "." else root / "mnist"
    names = [variant(s, dot, case) for s in STEMS]
    data, paths = write_set(folder, names, gz=gz)
    found = find_idx_files(root / "mnist")
    assert [found[s] for s in STEMS] == paths
    s = load_dataset("mnist", root, normalize=False)
    np.testing.assert_array_equal(s.train.y.numpy(), data[1])
    np.testing.assert_allclose(s.test.x[:, 0].numpy() * 255, data[2], atol=1e-4)
    assert s.files == tuple(str(p) for p in paths)  # the run folder records these


def test_issue_case_public_mirror_names_in_flatminima_data(tmp_path, monkeypatch):
    """MNIST as public mirrors ship it (a dot before idx) in $FLATMINIMA_DATA/mnist."""
    names = ["train-images.idx3-ubyte", "train-labels.idx1-ubyte"]
    names += ["t10k-images.idx3-ubyte", "t10k-labels.idx1-ubyte"]
    write_set(tmp_path / "env" / "mnist", names)
    monkeypatch.setenv("FLATMINIMA_DATA", str(tmp_path / "env"))
    assert locate_dataset("mnist") == tmp_path / "env" / "mnist"
    rc, out, _ = run_cli(["data"])
    row = [ln for ln in out.splitlines() if ln.split()[:2] == ["mnist", "yes"]]
    assert rc == 0 and row and str(tmp_path / "env" / "mnist") in row[0]


def test_lookalike_files_are_listed_in_the_error(tmp_path):
    folder = tmp_path / "mnist"
    write_set(folder, ["train_images_idx3.bin", "mnist-train-labels", "t10k-images", "t10k.lbl"])
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", tmp_path)
    msg = str(info.value)
    for name in ("train_images_idx3.bin", "mnist-train-labels", "t10k-images"):
        assert name in msg
    assert "match no known name" in msg and "flatminima data --download mnist" in msg


def test_incomplete_folder_names_the_missing_files(tmp_path):
    _, paths = write_set(tmp_path / "fashion-mnist")
    paths[3].unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist", tmp_path)
    assert "incomplete: missing t10k-labels-idx1-ubyte" in str(info.value)
    assert "train-images" not in str(info.value).split("missing")[1].split(";")[0]


# ----------------------------------------------------------------------- a named root is final


def test_missing_data_root_is_an_error_not_the_system_copy(tmp_path, monkeypatch):
    write_set(tmp_path / "system")
    monkeypatch.setattr(sources, "SYSTEM_DIRS", {"fashion-mnist": [tmp_path / "system"]})
    assert locate_dataset("fashion-mnist") == tmp_path / "system"  # the default still works
    with pytest.raises(DatasetNotFoundError, match=r"data root .*nope: the folder does not exist"):
        load_dataset("fashion-mnist", tmp_path / "nope")
    monkeypatch.setenv("FLATMINIMA_DATA", str(tmp_path / "env"))
    (tmp_path / "env").mkdir()
    _, paths = write_set(tmp_path / "env" / "fashion-mnist")
    paths[0].unlink()  # incomplete
    with pytest.raises(DatasetNotFoundError, match=r"FLATMINIMA_DATA=.*incomplete"):
        load_dataset("fashion-mnist")
    assert locate_dataset("fashion-mnist") is None


def test_train_cli_with_missing_data_root_fails_in_one_line(tmp_path, monkeypatch):
    write_set(tmp_path / "system")
    monkeypatch.setattr(sources, "SYSTEM_DIRS", {"fashion-mnist": [tmp_path / "system"]})
    argv = ["train", "--data", "fashion-mnist", "--model", "mlp", "--epochs", "1"]
    argv += ["--no-progress", "--data-root", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]
    rc, _, err = run_cli(argv)
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert "does not exist" in err


# ----------------------------------------------------------------------- corrupt files


def _corrupt(tmp_path, which: int, blob: bytes):
    folder = tmp_path / "mnist"
    _, paths = write_set(folder)
    paths[which].write_bytes(blob)
    with pytest.raises(ValueError) as info:
        load_dataset("mnist", tmp_path)
    msg = str(info.value)
    assert str(paths[which]) in msg and "\n" not in msg
    return msg


def test_bad_magic_names_the_file(tmp_path):
    msg = _corrupt(tmp_path, 0, b"\x01\x02\x08\x03" + bytes(20))
    assert "magic" in msg


def test_truncated_payload_names_the_file(tmp_path):
    blob = idx_bytes(arrays()[0], 0x08)
    msg = _corrupt(tmp_path, 0, blob[:-7])
    assert "expected 4704 bytes, found 4697" in msg  # 6 * 28 * 28


def test_images_and_labels_disagree(tmp_path):
    msg = _corrupt(tmp_path, 1, idx_bytes(np.zeros(5, np.uint8), 0x08))
    assert "5 labels but train-images-idx3-ubyte holds 6 images" in msg


def test_labels_out_of_range(tmp_path):
    msg = _corrupt(tmp_path, 3, idx_bytes(np.array([1, 2, 12, 3], np.uint8), 0x08))
    assert "outside the classes 0..9" in msg and "12" in msg


def test_float_labels_are_refused_not_truncated(tmp_path):
    msg = _corrupt(tmp_path, 1, idx_bytes(np.array([2.5, 1, 0, 3, 4, 5], np.float32), 0x0D))
    assert "integer labels" in msg and "float32" in msg


def test_non_uint8_images_are_refused(tmp_path):
    msg = _corrupt(tmp_path, 2, idx_bytes(np.zeros((4, 28, 28), np.float64), 0x0E))
    assert "uint8" in msg


def test_corrupt_gzip_names_the_file(tmp_path):
    folder = tmp_path / "mnist"
    _, paths = write_set(folder, gz=True)
    paths[2].write_bytes(paths[2].read_bytes()[:30])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz.*gzip"):
        load_dataset("mnist", tmp_path)


# ----------------------------------------------------------------------- flatminima data --download


def run_cli(argv):
    from flatminima import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except SystemExit as exc:
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def _file_remotes(tmp_path, md5_of=None):
    _, paths = write_set(tmp_path / "mirror", gz=True)
    md5_of = md5_of or (lambda p: hashlib.md5(p.read_bytes()).hexdigest())
    return tuple(dl.RemoteFile(p.name, (p.as_uri(),), md5=md5_of(p)) for p in paths)


def test_data_download_fetches_verifies_and_shows_progress(tmp_path, monkeypatch):
    monkeypatch.setattr(ds_mod, "REMOTE_FILES", {"mnist": _file_remotes(tmp_path)})
    rc, out, err = run_cli(["data", "--download", "mnist", "--root", str(tmp_path / "home")])
    assert rc == 0, err
    assert "verified" in out and "train-images-idx3-ubyte.gz" in err  # the progress bar
    for s in STEMS:
        got = (tmp_path / "home" / "mnist" / (s + ".gz")).read_bytes()
        assert got == (tmp_path / "mirror" / (s + ".gz")).read_bytes()
    assert len(load_dataset("mnist", tmp_path / "home").train) == 6
    # again: the verified files are kept, nothing is fetched
    monkeypatch.setattr(dl, "_fetch", None)
    assert run_cli(["data", "--download", "mnist", "--root", str(tmp_path / "home")])[0] == 0


def test_data_download_checksum_mismatch_is_one_line(tmp_path, monkeypatch):
    remotes = _file_remotes(tmp_path, md5_of=lambda p: "0" * 32)
    monkeypatch.setattr(ds_mod, "REMOTE_FILES", {"mnist": remotes})
    argv = ["data", "--download", "mnist", "--root", str(tmp_path / "home"), "--no-progress"]
    rc, _, err = run_cli(argv)
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert "checksum mismatch" in err
    assert not list((tmp_path / "home" / "mnist").glob("*.gz"))  # nothing unverified kept


def test_data_download_unknown_or_without_url(tmp_path):
    rc, _, err = run_cli(["data", "--download", "digits", "--root", str(tmp_path)])
    assert rc == 1 and "no download is known for 'digits'" in err
    rc, _, err = run_cli(["data", "--download", "imagenet", "--root", str(tmp_path)])
    assert rc == 1 and "unknown data set 'imagenet'" in err


def test_not_found_message_points_to_the_download_command(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="flatminima data --download fashion-mnist"):
        load_dataset("fashion-mnist", tmp_path)
