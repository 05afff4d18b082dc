"""load_dataset semantics, synthetic sets, Augment and TensorLoader of flatminima.data."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flatminima.data import (
    DATASETS,
    ArrayDataset,
    Augment,
    TensorLoader,
    default_augment,
    gaussian_mixture,
    load_dataset,
    sources,
    teacher_student,
)

FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    monkeypatch.delenv("FLATMINIMA_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(sources, "SYSTEM_DIRS", {})


def rows_set(x: torch.Tensor) -> set:
    return {tuple(r) for r in x.reshape(len(x), -1).tolist()}


# ----------------------------------------------------------------------------- synthetic


def test_gmm_matches_model_and_bayes_error():
    dim, delta = 20, 0.5
    x, y, xt, yt, info = gaussian_mixture(dim=dim, num_train=40000, num_test=40000, delta=delta)
    v = info["v"]
    for cls, sign in ((1, 1.0), (0, -1.0)):
        xc = x[y == cls]
        # E[x | y] = y v / sqrt(N), Var = Delta per coordinate
        assert torch.allclose(
            xc.mean(0), sign * v / math.sqrt(dim), atol=5 * math.sqrt(delta / len(xc))
        )
        assert abs(xc.var(0).mean().item() - delta) < 0.02
    assert abs(y.float().mean().item() - 0.5) < 0.01
    # classifier sign(v.x): error = H(|v| / sqrt(N Delta)) exactly, H(t) = erfc(t/sqrt2)/2
    err = ((xt @ v > 0).long() != yt).float().mean().item()
    h = 0.5 * math.erfc(v.norm().item() / math.sqrt(dim * delta) / math.sqrt(2))
    assert abs(err - h) < 4 * math.sqrt(h * (1 - h) / len(yt))


def test_gmm_alpha_rho_and_seeding():
    x, y, *_ = gaussian_mixture(dim=50, alpha=3.0, num_test=10, rho=0.2, seed=1)
    assert x.shape == (150, 50)
    x2, y2, *_ = gaussian_mixture(dim=50, alpha=3.0, num_test=10, rho=0.2, seed=1)
    x3, *_ = gaussian_mixture(dim=50, alpha=3.0, num_test=10, rho=0.2, seed=2)
    assert torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, x3)
    xb, yb, *_ = gaussian_mixture(dim=5, num_train=20000, num_test=10, rho=0.2)
    assert abs(yb.float().mean().item() - 0.2) < 0.015
    for bad in ({"rho": 1.0}, {"delta": 0.0}, {"dim": 0}, {"num_train": 10, "alpha": 1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            gaussian_mixture(**bad)


def test_teacher_student_linear_teacher_labels():
    x, y, xt, yt, info = teacher_student(dim=30, num_train=2000, num_test=500, hidden=())
    (w,) = info["teacher"]
    wn = w.double().numpy()
    expect = (x.double().numpy() @ (wn[1] - wn[0]) > 0).astype(np.int64)
    np.testing.assert_array_equal(y.numpy(), expect)
    assert 0.3 < y.float().mean().item() < 0.7
    _, y4, *_ = teacher_student(dim=10, num_train=3000, num_test=5, num_classes=4, hidden=(16,))
    assert set(y4.tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="activation"):
        teacher_student(activation="gelu")


def test_load_synthetic_through_load_dataset():
    s = load_dataset("teacher-student", dim=12, num_train=100, num_test=30, num_classes=3, seed=4)
    assert s.input_shape == (12,) and s.num_classes == 3 and s.source == "synthetic"
    assert s.mean is None and s.std is None  # synthetic sets keep their scale
    g = load_dataset("gmm", dim=8, num_train=64, num_test=16)
    assert (
        g.num_classes == 2 and g.train.x.dtype == torch.float32 and g.train.y.dtype == torch.int64
    )
    with pytest.raises(ValueError, match="gmm"):
        load_dataset("gmm", bogus=1)


# ----------------------------------------------------------------------------- splits


def test_val_split_partitions_training_set():
    kw = dict(dim=6, num_train=200, num_test=10, seed=3)
    full = load_dataset("gmm", **kw)
    s = load_dataset("gmm", val_size=0.25, **kw)
    assert len(s.val) == 50 and len(s.train) == 150
    tr, va = rows_set(s.train.x), rows_set(s.val.x)
    assert not tr & va and tr | va == rows_set(full.train.x)
    s_int = load_dataset("gmm", val_size=50, **kw)
    assert torch.equal(s_int.val.x, s.val.x)  # same seed, same split
    other = load_dataset("gmm", val_size=50, **{**kw, "seed": 4})
    assert not torch.equal(other.val.x, s.val.x)
    assert torch.equal(s.test.x, full.test.x)


def test_train_subset_seeded_and_val_unchanged():
    kw = dict(dim=4, num_train=300, num_test=10, val_size=30)
    a = load_dataset("gmm", train_subset=50, **kw)
    b = load_dataset("gmm", **kw)
    assert len(a.train) == 50 and rows_set(a.train.x) <= rows_set(b.train.x)
    assert torch.equal(a.val.x, b.val.x)
    assert torch.equal(a.train.x, load_dataset("gmm", train_subset=50, **kw).train.x)
    c = load_dataset("gmm", train_subset=50, seed=1, **kw)
    assert not torch.equal(a.train.x, c.train.x)
    with pytest.raises(ValueError, match="train_subset=271"):
        load_dataset("gmm", train_subset=271, **kw)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.37, 1.0])
def test_label_noise_exact_fraction_never_same(fraction):
    kw = dict(dim=5, num_train=1000, num_test=100, num_classes=5, val_size=100, seed=7)
    clean = load_dataset("teacher-student", **kw)
    noisy = load_dataset("teacher-student", label_noise=fraction, **kw)
    assert torch.equal(noisy.train.x, clean.train.x)
    changed = noisy.train.y != clean.train.y
    # every chosen label moved to a different class, so exactly round(f * N) differ
    assert int(changed.sum()) == round(fraction * len(clean.train))
    assert torch.equal(noisy.val.y, clean.val.y) and torch.equal(noisy.test.y, clean.test.y)
    assert noisy.train.y.min() >= 0 and noisy.train.y.max() < 5
    again = load_dataset("teacher-student", label_noise=fraction, **kw)
    assert torch.equal(again.train.y, noisy.train.y)


@pytest.mark.parametrize("seed", [0, 1])
def test_label_noise_is_independent_of_the_loader_order(seed):
    # Regression: the flip order used to be drawn from the same seed stream as the loader's
    # epoch 2 (seed 0), so that epoch began with every flipped sample. The trainer's loader for
    # data seed s uses seed s * 1009 (+ replica stream); in every early epoch the flipped
    # samples must be spread through the epoch, not bunched at its start.
    from flatminima.data import TensorLoader

    kw = dict(dim=5, num_train=2000, num_test=10, num_classes=5, seed=seed)
    clean = load_dataset("teacher-student", **kw).train
    noisy = load_dataset("teacher-student", label_noise=0.4, **kw).train
    flipped = (noisy.y != clean.y).double()
    loader = TensorLoader(noisy, batch_size=100, shuffle=True, drop_last=True, seed=seed * 1009)
    for epoch in range(8):
        order = loader._order(epoch)
        first = flipped[order[:800]].mean().item()  # the first 40 % of the epoch
        assert abs(first - 0.4) < 0.08, (epoch, first)


def test_label_noise_uniform_over_other_classes():
    kw = dict(dim=5, num_train=9000, num_test=10, num_classes=4, seed=0)
    clean = load_dataset("teacher-student", **kw).train.y
    noisy = load_dataset("teacher-student", label_noise=1.0, **kw).train.y
    shift = ((noisy - clean) % 4).bincount(minlength=4)
    assert shift[0] == 0
    expected = len(clean) / 3
    chi2 = (((shift[1:].double() - expected) ** 2) / expected).sum().item()
    assert chi2 < 13.8  # chi-square, 2 dof, p = 0.001
    other_seed = load_dataset("teacher-student", label_noise=0.5, **{**kw, "seed": 1})
    assert not torch.equal(
        other_seed.train.y, load_dataset("teacher-student", label_noise=0.5, **kw).train.y
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"val_size": 1.5}, "val_size"),
        ({"val_size": -1}, "val_size"),
        ({"val_size": 64}, "leaves no training"),
        ({"label_noise": 1.2}, "label_noise"),
        ({"train_subset": 0}, "train_subset"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_dataset("gmm", dim=3, num_train=64, num_test=4, **kwargs)


def _fake_cifar(folder: Path, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    scale = np.array([1.0, 0.5, 0.2])[:, None]  # channels with different statistics
    all_data = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = (rng.integers(0, 256, (n, 3, 1024)) * scale[None]).astype(np.uint8).reshape(n, 3072)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": d, b"labels": list(rng.integers(0, 10, n))}, f, protocol=2)
        all_data.append(d)
    return np.concatenate(all_data)


def test_normalisation_per_channel_from_train(tmp_path, isolated):
    raw = _fake_cifar(tmp_path / "cifar-10-batches-py", 8, 0)
    s = load_dataset("cifar10", tmp_path, val_size=10)
    for split in (s.train,):
        m = split.x.double().mean(dim=(0, 2, 3))
        sd = split.x.double().std(dim=(0, 2, 3), unbiased=False)
        assert torch.allclose(m, torch.zeros(3, dtype=torch.float64), atol=1e-5)
        assert torch.allclose(sd, torch.ones(3, dtype=torch.float64), atol=1e-5)
    # test split uses the train statistics: x = (raw / 255 - mean_c) / std_c
    test_raw = torch.from_numpy(raw[-8:].reshape(8, 3, 32, 32)).double() / 255
    mean, std = torch.tensor(s.mean).view(1, 3, 1, 1), torch.tensor(s.std).view(1, 3, 1, 1)
    assert torch.allclose(s.test.x.double(), (test_raw - mean) / std, atol=1e-5)
    assert s.std[2] < s.std[0]
    plain = load_dataset("cifar10", tmp_path, normalize=False)
    assert plain.mean is None and 0 <= plain.train.x.min() and plain.train.x.max() <= 1
    with pytest.raises(ValueError, match="no extra keyword"):
        load_dataset("cifar10", tmp_path, dim=3)


def test_digits():
    pytest.importorskip("sklearn", reason="scikit-learn not installed")
    s = load_dataset("digits", val_size=0.1)
    assert s.input_shape == (1, 8, 8) and s.num_classes == 10 and s.source == "scikit-learn"
    assert len(s.train) + len(s.val) + len(s.test) == 1797 and len(s.test) == 359
    assert (
        abs(s.train.x.mean().item()) < 1e-5 and abs(s.train.x.std(unbiased=False).item() - 1) < 1e-5
    )


@pytest.mark.skipif(
    not FASHION.is_dir(), reason=f"{FASHION} not present (apt install dataset-fashion-mnist)"
)
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv("FLATMINIMA_DATA", raising=False)
    s = load_dataset("fashion-mnist", root=FASHION, normalize=False)
    assert (len(s.train), len(s.test), s.num_classes, s.input_shape) == (
        60000,
        10000,
        10,
        (1, 28, 28),
    )
    # published facts: 6000 training and 1000 test images per class; pixel mean 0.2860
    assert s.train.y.bincount().tolist() == [6000] * 10
    assert s.test.y.bincount().tolist() == [1000] * 10
    assert abs(s.train.x.mean().item() - 0.2860) < 1e-3


# ----------------------------------------------------------------------------- Augment


def reference_augment(x, p, hflip, seed):
    """Per-sample reference with the documented draw order."""
    g = torch.Generator().manual_seed(seed)
    n, _, h, w = x.shape
    off = torch.randint(0, 2 * p + 1, (n, 2), generator=g) if p > 0 else torch.full((n, 2), 0)
    flips = torch.rand(n, generator=g) < 0.5 if hflip else torch.zeros(n, dtype=torch.bool)
    out = []
    for i in range(n):
        padded = F.pad(x[i], (p, p, p, p))
        a, b = off[i].tolist()
        xi = padded[:, a : a + h, b : b + w]
        out.append(xi.flip(2) if flips[i] else xi)
    return torch.stack(out), off, flips


@pytest.mark.parametrize("p,hflip", [(0, True), (4, False), (3, True), (2, True)])
def test_augment_matches_per_sample_reference(p, hflip):
    x = torch.randn(64, 3, 9, 7)
    out = Augment(p, hflip)(x, torch.Generator().manual_seed(11))
    ref, off, flips = reference_augment(x, p, hflip, 11)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, ref)
    # crop is a shift by (p - a, p - b) with zero fill: compare with torch.roll + mask
    for i in range(0, 64, 7):
        dy, dx = p - off[i, 0].item(), p - off[i, 1].item()
        shifted = torch.roll(x[i], shifts=(dy, dx), dims=(1, 2))
        rows = torch.arange(9)[:, None] - dy
        cols = torch.arange(7)[None, :] - dx
        valid = (rows >= 0) & (rows < 9) & (cols >= 0) & (cols < 7)
        expect = torch.where(valid, shifted, torch.zeros(()))
        assert torch.equal(out[i], expect.flip(2) if flips[i] else expect)


def test_augment_flip_mirrors_and_draws_cover_range():
    x = torch.arange(2000 * 5, dtype=torch.float32).reshape(2000, 1, 1, 5)
    out = Augment(0, True)(x, torch.Generator().manual_seed(0))
    flipped = (out != x).any(dim=(1, 2, 3))
    assert torch.equal(out[flipped], x[flipped].flip(3)) and torch.equal(out[~flipped], x[~flipped])
    assert 0.45 < flipped.float().mean().item() < 0.55
    # crop offsets: every one of the (2p+1)^2 shifts occurs
    ones = torch.ones(500, 1, 5, 5)
    out = Augment(1, False)(ones, torch.Generator().manual_seed(0))
    patterns = {tuple(o.flatten().tolist()) for o in out}
    assert len(patterns) == 9
    assert torch.equal(Augment(0, False)(x, torch.Generator()), x)


def test_augment_bad_input():
    with pytest.raises(ValueError, match="crop_padding"):
        Augment(-1)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        Augment()(torch.zeros(3, 4), torch.Generator())


def test_default_augment():
    assert default_augment("cifar10").crop_padding == 4 and default_augment("cifar10").hflip
    assert not default_augment("mnist").hflip
    assert default_augment("digits") is None and default_augment("gmm") is None
    assert all(
        default_augment(n) is None or isinstance(default_augment(n), Augment) for n in DATASETS
    )
    with pytest.raises(ValueError, match="valid"):
        default_augment("svhn")


# ----------------------------------------------------------------------------- TensorLoader


def tagged(n: int, image: bool = False) -> ArrayDataset:
    """x carries the sample index so batches can be traced back."""
    idx = torch.arange(n)
    x = (
        idx.float()[:, None, None, None].expand(n, 1, 4, 4).clone()
        if image
        else idx.float()[:, None]
    )
    return ArrayDataset(x, idx.clone())


def test_loader_each_sample_once_per_epoch():
    loader = TensorLoader(tagged(103), 10, seed=5)
    assert len(loader) == 11
    orders = []
    for _ in range(3):
        seen = []
        for xb, yb in loader:
            assert torch.equal(xb[:, 0].long(), yb)
            seen.append(yb)
        ys = torch.cat(seen)
        assert sorted(ys.tolist()) == list(range(103))
        orders.append(ys)
    assert not torch.equal(orders[0], orders[1])
    plain = TensorLoader(tagged(103), 10, shuffle=False)
    assert torch.equal(torch.cat([y for _, y in plain]), torch.arange(103))


def test_loader_drop_last():
    loader = TensorLoader(tagged(10), 4, drop_last=True)
    sizes = [len(y) for _, y in loader]
    assert sizes == [4, 4] and len(loader) == 2
    assert [len(y) for _, y in TensorLoader(tagged(10), 4)] == [4, 4, 2]
    with pytest.raises(ValueError, match="batch_size"):
        TensorLoader(tagged(10), 0)
    with pytest.raises(ValueError, match="image data"):
        TensorLoader(tagged(10), 2, augment=Augment())


def test_loader_resume_mid_epoch_and_at_epoch_end():
    data = ArrayDataset(torch.randn(50, 2, 6, 6), torch.arange(50))
    make = lambda: TensorLoader(data, 8, augment=Augment(2, True), seed=3)  # noqa: E731
    ref = make()
    stream = [b for _ in range(3) for b in ref]

    a = make()
    got = list(a)  # epoch 0 complete
    it = iter(a)
    got += [next(it), next(it)]  # part of epoch 1
    state = a.state_dict()
    assert (state["epoch"], state["batch"]) == (1, 2)
    del it, a
    b = make()
    b.load_state_dict(state)
    got += [bt for _ in range(2) for bt in b]  # rest of epoch 1, then epoch 2
    assert len(got) == len(stream)
    for (x1, y1), (x2, y2) in zip(got, stream):
        assert torch.equal(y1, y2) and torch.equal(x1, x2)

    c = make()
    for _ in c:
        pass
    st = c.state_dict()
    assert (st["epoch"], st["batch"]) == (1, 0)
    d = make()
    d.load_state_dict(st)
    assert all(torch.equal(x, xr) for (x, _), (xr, _) in zip(d, stream[len(ref) :]))
    with pytest.raises(ValueError, match="batch_size"):
        TensorLoader(data, 9).load_state_dict(st)


def test_loader_state_on_last_batch_starts_next_epoch():
    loader = TensorLoader(tagged(12), 4, seed=1)
    for _ in loader:
        state = loader.state_dict()  # taken inside the loop, after the last batch
    assert (state["epoch"], state["batch"]) == (1, 0)
