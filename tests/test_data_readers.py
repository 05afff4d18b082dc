"""File readers, file finding and checksummed downloads of flatminima.data."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import tarfile

import numpy as np
import pytest
import torch

from flatminima.data import (
    DatasetNotFoundError,
    DownloadError,
    describe_datasets,
    download_file,
    load_dataset,
    locate_dataset,
    read_cifar10,
    read_cifar100,
    read_idx,
    sources,
    verify_checksum,
    write_idx,
)
from flatminima.data import download as dl

IDX_STEMS = sources.IDX_FILES


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No user data folders, no system folders, cache inside tmp."""
    monkeypatch.delenv("FLATMINIMA_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(sources, "SYSTEM_DIRS", {})

    def no_network(url, dest, timeout):
        if not url.startswith("file:"):
            raise AssertionError(f"test tried to reach the network: {url}")
        return real_fetch(url, dest, timeout)

    real_fetch = dl._fetch
    monkeypatch.setattr(dl, "_fetch", no_network)


def idx_bytes(arr: np.ndarray, code: int) -> bytes:
    """Independent IDX encoder (spec: 0,0,code,ndim, big-endian uint32 dims, big-endian data)."""
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def make_idx_folder(folder, n_train=12, n_test=5, seed=0, gz=True):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = [
        rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_train, dtype=np.uint8),
        rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_test, dtype=np.uint8),
    ]
    for stem, a in zip(IDX_STEMS, arrays):
        blob = idx_bytes(a, 0x08)
        if gz:
            (folder / (stem + ".gz")).write_bytes(gzip.compress(blob))
        else:
            (folder / stem).write_bytes(blob)
    return arrays


def write_cifar_pickle(path, data, labels, key=b"labels", extra=None):
    obj = {b"batch_label": b"test", key: list(labels), b"data": data, b"filenames": []}
    obj.update(extra or {})
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_cifar10(folder, per_batch=3, n_test=4, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    batches = []
    for i in range(1, 6):
        d = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch)
        write_cifar_pickle(folder / f"data_batch_{i}", d, y)
        batches.append((d, y))
    dt = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    yt = rng.integers(0, 10, n_test)
    write_cifar_pickle(folder / "test_batch", dt, yt)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f, protocol=2)
    return batches, (dt, yt)


def make_cifar100(folder, n_train=7, n_test=3, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    out = []
    for name, n in (("train", n_train), ("test", n_test)):
        d = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n)
        write_cifar_pickle(
            folder / name, d, fine, key=b"fine_labels", extra={b"coarse_labels": list(fine // 5)}
        )
        out.append((d, fine))
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [b"x"] * 100, b"coarse_label_names": [b"y"] * 20}, f)
    return out


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "dtype,code", [(np.uint8, 0x08), (np.int16, 0x0B), (np.int32, 0x0C), (np.float32, 0x0D)]
)
def test_read_idx_round_trip(tmp_path, gz, dtype, code):
    arr = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype)
    if dtype == np.uint8:
        arr = np.arange(30, dtype=np.uint8).reshape(2, 3, 5)
    blob = idx_bytes(arr, code)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    path.write_bytes(gzip.compress(blob) if gz else blob)
    t = read_idx(path)
    assert t.shape == (2, 3, 5)
    np.testing.assert_array_equal(t.numpy(), arr)


def test_write_idx_matches_independent_encoder(tmp_path):
    arr = np.arange(24, dtype=np.int32).reshape(4, 6) - 3
    write_idx(tmp_path / "w.idx", torch.from_numpy(arr))
    assert (tmp_path / "w.idx").read_bytes() == idx_bytes(arr, 0x0C)
    write_idx(tmp_path / "w.idx.gz", arr)
    assert gzip.decompress((tmp_path / "w.idx.gz").read_bytes()) == idx_bytes(arr, 0x0C)


def test_read_idx_truncated_names_file_and_sizes(tmp_path):
    blob = idx_bytes(np.zeros((3, 4, 4), np.uint8), 0x08)
    p = tmp_path / "trunc-idx3-ubyte"
    p.write_bytes(blob[:-5])
    with pytest.raises(ValueError, match=r"trunc-idx3-ubyte.*expected 48 bytes, found 43"):
        read_idx(p)


def test_read_idx_trailing_bytes_rejected(tmp_path):
    p = tmp_path / "long"
    p.write_bytes(idx_bytes(np.zeros(4, np.uint8), 0x08) + b"xx")
    with pytest.raises(ValueError, match="expected 4 bytes, found 6"):
        read_idx(p)


def test_read_idx_wrong_magic_and_dtype(tmp_path):
    p = tmp_path / "bad"
    p.write_bytes(b"\x01\x00\x08\x01" + (2).to_bytes(4, "big") + b"ab")
    with pytest.raises(ValueError, match=r"bad.*magic"):
        read_idx(p)
    p.write_bytes(b"\x00\x00\x07\x01" + (2).to_bytes(4, "big") + b"ab")
    with pytest.raises(ValueError, match=r"bad.*dtype code 0x07"):
        read_idx(p)


def test_read_idx_corrupt_gzip_names_file(tmp_path):
    good = gzip.compress(idx_bytes(np.zeros((50, 50), np.uint8), 0x08))
    p = tmp_path / "broken.gz"
    p.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"broken\.gz.*corrupt gzip"):
        read_idx(p)
    p.write_bytes(good[:10] + b"\xff" * 20 + good[30:])
    with pytest.raises(ValueError, match=r"broken\.gz"):
        read_idx(p)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        read_idx(tmp_path / "nope")


# ----------------------------------------------------------------------------- CIFAR


def test_cifar10_round_trip(tmp_path):
    batches, (dt, yt) = make_cifar10(tmp_path / "cifar-10-batches-py")
    x_tr, y_tr, x_te, y_te, names = read_cifar10(tmp_path / "cifar-10-batches-py")
    assert x_tr.shape == (15, 3, 32, 32) and x_tr.dtype == torch.uint8
    assert names == [f"c{i}" for i in range(10)]
    d0 = batches[0][0]
    # pixel (c, h, w) of image i is column c*1024 + h*32 + w of the row
    assert x_tr[1, 2, 5, 7] == d0[1, 2 * 1024 + 5 * 32 + 7]
    np.testing.assert_array_equal(
        x_tr.reshape(15, -1).numpy(), np.concatenate([b[0] for b in batches])
    )
    np.testing.assert_array_equal(y_tr.numpy(), np.concatenate([b[1] for b in batches]))
    np.testing.assert_array_equal(x_te.reshape(4, -1).numpy(), dt)
    np.testing.assert_array_equal(y_te.numpy(), yt)


def test_cifar100_fine_and_coarse(tmp_path):
    (d, fine), (dt, fine_t) = make_cifar100(tmp_path / "cifar-100-python")
    x_tr, y_tr, x_te, y_te, names = read_cifar100(tmp_path / "cifar-100-python")
    np.testing.assert_array_equal(y_tr.numpy(), fine)
    np.testing.assert_array_equal(x_te.reshape(3, -1).numpy(), dt)
    assert len(names) == 100
    _, yc, _, _, _ = read_cifar100(tmp_path / "cifar-100-python", coarse=True)
    np.testing.assert_array_equal(yc.numpy(), fine // 5)


def test_cifar_wrong_shape_names_file(tmp_path):
    make_cifar10(tmp_path / "c")
    write_cifar_pickle(tmp_path / "c" / "data_batch_3", np.zeros((3, 3000), np.uint8), [0, 1, 2])
    with pytest.raises(ValueError, match=r"data_batch_3.*3072"):
        read_cifar10(tmp_path / "c")


def test_cifar_label_count_and_range(tmp_path):
    make_cifar10(tmp_path / "c")
    write_cifar_pickle(tmp_path / "c" / "test_batch", np.zeros((4, 3072), np.uint8), [0, 1])
    with pytest.raises(ValueError, match=r"test_batch.*2 labels for 4 images"):
        read_cifar10(tmp_path / "c")
    write_cifar_pickle(tmp_path / "c" / "test_batch", np.zeros((2, 3072), np.uint8), [0, 10])
    with pytest.raises(ValueError, match=r"test_batch.*\[0, 10\)"):
        read_cifar10(tmp_path / "c")


def test_cifar_missing_batch_and_malicious_pickle(tmp_path):
    make_cifar10(tmp_path / "c")
    (tmp_path / "c" / "data_batch_2").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_2"):
        read_cifar10(tmp_path / "c")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "c" / "data_batch_2", "wb") as f:
        pickle.dump({b"data": Evil()}, f)
    with pytest.raises(ValueError, match=r"data_batch_2.*not allowed"):
        read_cifar10(tmp_path / "c")


# ----------------------------------------------------------------------------- Tiny ImageNet


def test_tiny_imagenet_layout(tmp_path):
    Image = pytest.importorskip("PIL.Image", reason="Pillow not installed")
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n001", "n002", "n003"]
    root.mkdir()
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    colours = {"n001": (250, 0, 0), "n002": (0, 250, 0), "n003": (0, 0, 250)}
    for w in wnids:
        d = root / "train" / w / "images"
        d.mkdir(parents=True)
        for j in range(2):
            Image.new("RGB", (64, 64), colours[w]).save(d / f"{w}_{j}.JPEG")
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for j, w in enumerate(["n003", "n001"]):
        Image.new("L", (64, 64), 128).save(root / "val" / "images" / f"val_{j}.JPEG")
        lines.append(f"val_{j}.JPEG\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines))

    s = load_dataset("tiny-imagenet", tmp_path, normalize=False)
    assert s.num_classes == 3 and s.input_shape == (3, 64, 64)
    assert s.train.y.tolist() == [0, 0, 1, 1, 2, 2]
    assert s.test.y.tolist() == [2, 0]
    # solid colours survive JPEG to within a few levels; grayscale is expanded to RGB
    expect = torch.tensor([250, 0, 0]) / 255.0
    assert torch.allclose(s.train.x[0].mean(dim=(1, 2)), expect, atol=3 / 255)
    assert torch.allclose(s.test.x[0].mean(dim=(1, 2)), torch.full((3,), 128 / 255), atol=3 / 255)

    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn999\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match=r"val_annotations.txt:1.*n999"):
        load_dataset("tiny-imagenet", tmp_path)


# ----------------------------------------------------------------------------- finding files


def test_locate_order_root_env_system(tmp_path, monkeypatch):
    make_idx_folder(tmp_path / "env" / "fashion-mnist")
    make_idx_folder(tmp_path / "root" / "fashion-mnist", n_train=3)
    make_idx_folder(tmp_path / "system", n_train=4)
    assert locate_dataset("fashion-mnist") is None
    monkeypatch.setattr(sources, "SYSTEM_DIRS", {"fashion-mnist": [tmp_path / "system"]})
    assert locate_dataset("fashion-mnist") == tmp_path / "system"
    monkeypatch.setenv("FLATMINIMA_DATA", str(tmp_path / "env"))
    assert locate_dataset("fashion-mnist") == tmp_path / "env" / "fashion-mnist"
    assert locate_dataset("fashion-mnist", tmp_path / "root") == tmp_path / "root" / "fashion-mnist"
    s = load_dataset("fashion-mnist", tmp_path / "root")
    assert len(s.train) == 3 and s.source == str(tmp_path / "root" / "fashion-mnist")
    assert locate_dataset("mnist") is None  # no mnist subfolder anywhere


def test_locate_files_directly_in_root_raw_idx(tmp_path):
    arrays = make_idx_folder(tmp_path, gz=False)
    assert locate_dataset("mnist", tmp_path) == tmp_path
    s = load_dataset("mnist", tmp_path, normalize=False)
    np.testing.assert_allclose(s.train.x[:, 0].numpy() * 255, arrays[0], atol=1e-4)
    np.testing.assert_array_equal(s.test.y.numpy(), arrays[3])


def test_locate_cifar_layouts(tmp_path):
    make_cifar10(tmp_path / "cifar-10-batches-py")
    make_cifar100(tmp_path / "cifar100" / "cifar-100-python")
    assert locate_dataset("cifar10", tmp_path) == tmp_path / "cifar-10-batches-py"
    assert locate_dataset("cifar100", tmp_path) == tmp_path / "cifar100" / "cifar-100-python"
    rows = {r["name"]: r for r in describe_datasets(tmp_path)}
    assert set(rows) == set(sources.DATASETS)
    assert rows["cifar10"]["found"] and rows["cifar10"]["path"] == str(
        tmp_path / "cifar-10-batches-py"
    )
    assert not rows["mnist"]["found"] and "FLATMINIMA_DATA" in rows["mnist"]["notes"]
    assert rows["gmm"]["found"] and rows["gmm"]["kind"] == "synthetic"


def test_missing_dataset_says_how_to_obtain(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"dataset-fashion-mnist.*FLATMINIMA_DATA"):
        load_dataset("fashion-mnist", tmp_path)
    with pytest.raises(DatasetNotFoundError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", tmp_path)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"'imagenet'.*fashion-mnist.*teacher-student"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="cifar10"):
        locate_dataset("svhn")


# ----------------------------------------------------------------------------- downloads


def md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def test_verify_checksum_mismatch_deletes_file(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"hello")
    verify_checksum(p, sha256=hashlib.sha256(b"hello").hexdigest())
    verify_checksum(p, md5=md5(b"hello"))
    wrong = "0" * 32
    with pytest.raises(ValueError, match=rf"f\.bin.*expected {wrong}, got {md5(b'hello')}"):
        verify_checksum(p, md5=wrong)
    assert not p.exists()


def test_download_file_url_verified_and_wrong_checksum(tmp_path):
    src = tmp_path / "remote" / "blob.gz"
    src.parent.mkdir()
    src.write_bytes(b"payload" * 100)
    good = dl.RemoteFile("blob.gz", (src.as_uri(),), md5=md5(src.read_bytes()))
    out = download_file(good, tmp_path / "dest")
    assert out.read_bytes() == src.read_bytes()

    bad = dl.RemoteFile("blob2.gz", (src.as_uri(),), md5="f" * 32)
    with pytest.raises(ValueError, match=rf"blob2\.gz.*expected {'f' * 32}, got {good.md5}"):
        download_file(bad, tmp_path / "dest")
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["blob.gz"]


def test_download_failure_is_fast_and_explains(tmp_path):
    missing = dl.RemoteFile("x.gz", ((tmp_path / "no-such-file").as_uri(),), md5="0" * 32)
    with pytest.raises(DownloadError, match=r"x\.gz.*get it by hand"):
        download_file(missing, tmp_path / "d", how_to="get it by hand")
    assert not (tmp_path / "d" / "x.gz.part").exists()


def test_load_dataset_download_mnist_end_to_end(tmp_path, monkeypatch):
    arrays = make_idx_folder(tmp_path / "mirror", n_train=9, n_test=4)
    remotes = tuple(
        dl.RemoteFile(
            s + ".gz",
            ((tmp_path / "mirror" / (s + ".gz")).as_uri(),),
            md5=md5((tmp_path / "mirror" / (s + ".gz")).read_bytes()),
        )
        for s in IDX_STEMS
    )
    monkeypatch.setattr(dl, "REMOTE_FILES", {**dl.REMOTE_FILES, "mnist": remotes})
    from flatminima.data import datasets as ds_mod

    monkeypatch.setattr(ds_mod, "REMOTE_FILES", dl.REMOTE_FILES)
    with pytest.raises(DatasetNotFoundError, match="download=True"):
        load_dataset("mnist", tmp_path / "home")
    s = load_dataset("mnist", tmp_path / "home", download=True, normalize=False)
    assert (tmp_path / "home" / "mnist" / "train-images-idx3-ubyte.gz").is_file()
    np.testing.assert_array_equal(s.train.y.numpy(), arrays[1])
    assert len(s.test) == 4


def test_load_dataset_download_cifar10_tar(tmp_path, monkeypatch):
    make_cifar10(tmp_path / "src" / "cifar-10-batches-py")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    remote = dl.RemoteFile(archive.name, (archive.as_uri(),), md5=md5(archive.read_bytes()))
    from flatminima.data import datasets as ds_mod

    monkeypatch.setattr(ds_mod, "REMOTE_FILES", {**dl.REMOTE_FILES, "cifar10": (remote,)})
    monkeypatch.setenv("FLATMINIMA_DATA", str(tmp_path / "data"))
    s = load_dataset("cifar10", download=True)
    assert len(s.train) == 15 and s.source == str(tmp_path / "data" / "cifar-10-batches-py")
    assert s.input_shape == (3, 32, 32) and s.num_classes == 10


def test_known_checksums_are_well_formed():
    for name, files in dl.REMOTE_FILES.items():
        assert name in sources.DATASETS
        for f in files:
            assert f.md5 is not None and len(f.md5) == 32 and int(f.md5, 16) >= 0
            assert all(u.startswith(("http://", "https://")) for u in f.urls)
