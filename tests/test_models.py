"""Tests for flatminima.models: shapes, exact parameter counts, factory contract, init,
determinism, torch.func compatibility and a small optimisation sanity check."""

from __future__ import annotations

import csv
import doctest
import gzip
import math
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state

import flatminima.models as fm_models
from flatminima.models import (
    MLP,
    MODELS,
    DropPath,
    EfficientNetB0,
    MBConv,
    ResNet18,
    SmallCNN,
    SqueezeExcitation,
    WideResNet,
    build_model,
    count_parameters,
)

SHAPES = [(1, 28, 28), (3, 32, 32), (64,)]

# Small configurations so the shape tests stay fast on 2 CPU cores.
SMALL_KWARGS: dict[str, dict[str, object]] = {
    "mlp": {"hidden": (16, 8)},
    "cnn": {"width": 8},
    "resnet18": {"width": 4},
    "wrn": {"depth": 10, "widen_factor": 1},
    "efficientnet_b0": {"width_mult": 0.25, "depth_mult": 0.25},
}


# ----------------------------------------------------------------------------- helpers
def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    # torch.testing.assert_close costs seconds of lazy imports on first use; this is enough.
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, rtol=rtol, atol=atol), (a - b).abs().max().item()


# ----------------------------------------------------------------------------- closed forms
def mlp_count(d: int, hidden: tuple[int, ...], c: int) -> int:
    widths = (d, *hidden, c)
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def cnn_count(c_in: int, h: int, w: int, width: int, c: int) -> int:
    c1, c2, f = width // 2, width, 4 * width
    return (
        (c_in * 9 * c1 + c1) + (c1 * 9 * c2 + c2) + (c2 * (h // 4) * (w // 4) * f + f) + (f * c + c)
    )


def resnet18_count(c_in: int, w: int, c: int) -> int:
    total = 9 * c_in * w + 2 * w  # stem conv + BN
    cin = w
    for i in range(4):
        cout = w * 2**i
        total += 9 * cin * cout + 2 * cout + 9 * cout * cout + 2 * cout  # block 1
        if cin != cout or i > 0:
            total += cin * cout + 2 * cout  # projection shortcut + BN
        total += 2 * (9 * cout * cout + 2 * cout)  # block 2
        cin = cout
    return total + cin * c + c


def wrn_count(c_in: int, depth: int, k: int, c: int) -> int:
    n = (depth - 4) // 6
    widths = (16, 16 * k, 32 * k, 64 * k)
    total = 9 * c_in * 16
    for g in range(3):
        cin, cout = widths[g], widths[g + 1]
        for b in range(n):
            a = cin if b == 0 else cout
            total += 2 * a + 9 * a * cout + 2 * cout + 9 * cout * cout
            if b == 0 and (a != cout or g > 0):  # projection: channels or stride change
                total += a * cout
    return total + 2 * widths[3] + widths[3] * c + c


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", MODELS)
def test_output_shape_and_backward(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, 7, **SMALL_KWARGS[name])
    x = torch.randn(3, *shape)
    out = model(x)
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()
    out.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"


def test_flat_square_input_is_read_as_image() -> None:
    # A conv model on flat (64,) input must equal the same model on (1, 8, 8) images.
    torch.manual_seed(0)
    flat = SmallCNN((64,), 10, width=8).eval()
    torch.manual_seed(0)
    image = SmallCNN((1, 8, 8), 10, width=8).eval()
    x = torch.randn(4, 1, 8, 8)
    assert_close(flat(x.reshape(4, 64)), image(x))


def test_cnn_large_images_are_pooled_to_8x8() -> None:
    model = SmallCNN((3, 96, 80), 5, width=8)
    assert model(torch.randn(2, 3, 96, 80)).shape == (2, 5)
    linear = [m for m in model if isinstance(m, nn.Linear)][0]
    assert linear.in_features == 8 * 8 * 8


# ----------------------------------------------------------------------------- parameter counts
def test_reference_parameter_counts() -> None:
    assert count_parameters(ResNet18((3, 32, 32), 10)) == 11_173_962
    assert count_parameters(WideResNet((3, 32, 32), 10)) == 36_479_194


@pytest.mark.parametrize("width", [4, 16])
def test_resnet18_count_closed_form(width: int) -> None:
    for c_in, c in [(3, 10), (1, 100)]:
        model = build_model("resnet18", (c_in, 32, 32), c, width=width)
        assert count_parameters(model) == resnet18_count(c_in, width, c)


@pytest.mark.parametrize(("depth", "k"), [(10, 1), (16, 4), (22, 2)])
def test_wrn_count_closed_form(depth: int, k: int) -> None:
    assert count_parameters(WideResNet((3, 32, 32), 10, depth, k)) == wrn_count(3, depth, k, 10)


def test_mlp_and_cnn_count_closed_form() -> None:
    assert count_parameters(MLP((1, 28, 28), 10)) == mlp_count(784, (256, 256), 10)
    assert count_parameters(MLP((64,), 3, hidden=())) == 64 * 3 + 3
    assert count_parameters(SmallCNN((1, 28, 28), 10)) == cnn_count(1, 28, 28, 32, 10)
    assert count_parameters(SmallCNN((3, 32, 32), 10, width=12)) == cnn_count(3, 32, 32, 12, 10)


def test_count_parameters_options() -> None:
    model = MLP((4,), 2, hidden=(3,))
    model[1].weight.requires_grad_(False)
    assert count_parameters(model) == 4 * 3 + 3 + 3 * 2 + 2
    assert count_parameters(model, trainable_only=True) == 3 + 3 * 2 + 2
    shared = nn.Linear(5, 5)
    assert count_parameters(nn.Sequential(shared, shared)) == 30
    with pytest.raises(ValueError, match="nn.Module"):
        count_parameters("resnet18")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- architecture
def test_resnet18_is_cifar_style() -> None:
    model = ResNet18((3, 32, 32), 10)
    stem_conv = model.stem[0]
    assert stem_conv.kernel_size == (3, 3) and stem_conv.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    # stages w, 2w, 4w, 8w; spatial 32 -> 32, 16, 8, 4
    x = model.stem(torch.randn(1, 3, 32, 32))
    for layer, (ch, side) in zip(
        (model.layer1, model.layer2, model.layer3, model.layer4),
        [(64, 32), (128, 16), (256, 8), (512, 4)],
    ):
        x = layer(x)
        assert x.shape == (1, ch, side, side)
        assert len(layer) == 2


def test_residual_init_kaiming_and_batchnorm() -> None:
    torch.manual_seed(0)
    for model in (ResNet18((3, 32, 32), 10, width=32), WideResNet((3, 32, 32), 10, 16, 4)):
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        big = max(convs, key=lambda m: m.weight.numel())
        fan_out = big.out_channels * big.kernel_size[0] * big.kernel_size[1]
        std = big.weight.std().item()
        assert abs(std / math.sqrt(2.0 / fan_out) - 1) < 0.02  # >= 2e5 draws
        assert abs(big.weight.mean().item()) < 0.05 * std
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            assert torch.equal(bn.weight, torch.ones_like(bn.weight))
            assert torch.equal(bn.bias, torch.zeros_like(bn.bias))


def test_batchnorm_and_dropout_options() -> None:
    cnn = SmallCNN((1, 28, 28), 10, batchnorm=True, dropout=0.5)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in cnn.modules()) == 2
    assert all(m.bias is None for m in cnn.modules() if isinstance(m, nn.Conv2d))
    assert sum(isinstance(m, nn.Dropout) for m in cnn.modules()) == 1
    mlp = MLP((10,), 2, hidden="8,8", batchnorm=True, dropout=0.2, activation="tanh")
    assert sum(isinstance(m, nn.BatchNorm1d) for m in mlp.modules()) == 2
    assert sum(isinstance(m, nn.Tanh) for m in mlp.modules()) == 2
    # Dropout is active in train mode and off in eval mode.
    x = torch.randn(16, 1, 28, 28)
    cnn.eval()
    assert_close(cnn(x), cnn(x))
    cnn.train()
    assert not torch.equal(cnn(x), cnn(x))
    wrn = WideResNet((3, 8, 8), 10, 10, 1, dropout=0.3)
    assert sum(isinstance(m, nn.Dropout) for m in wrn.modules()) == 3


def test_wrn_shortcut_matches_reference_semantics() -> None:
    # Pre-activation block with a projection: y = conv2(relu(bn2(conv1(a)))) + conv_sc(a),
    # a = relu(bn1(x)); with the identity: y = ... + x.  Checked against a direct computation.
    torch.manual_seed(0)
    model = WideResNet((3, 8, 8), 10, depth=16, widen_factor=2).eval()
    for block in (model.block2[0], model.block2[1]):
        x = torch.randn(2, block.conv1.in_channels, 8, 8)
        a = F.relu(block.bn1(x))
        body = block.conv2(F.relu(block.bn2(block.conv1(a))))
        skip = x if block.shortcut is None else block.shortcut(a)
        assert_close(block(x), body + skip)
    assert model.block2[0].shortcut is not None and model.block2[1].shortcut is None


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("depth", [4, 9, 27, 30, 0, 2.5])
def test_wrn_depth_validation(depth: object) -> None:
    with pytest.raises(ValueError, match="depth"):
        WideResNet((3, 32, 32), 10, depth=depth)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="depth"):
        build_model("wrn", (3, 32, 32), 10, depth=depth)


def test_unknown_model_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="vgg16") as info:
        build_model("vgg16", (3, 32, 32), 10)
    for name in MODELS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="timm:<model>"):
        build_model("timmy:resnet", (3, 32, 32), 10)
    with pytest.raises(ValueError):
        build_model(None, (3, 32, 32), 10)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "bad", "accepted"),
    [
        ("mlp", "width", ("hidden", "activation", "batchnorm", "dropout")),
        ("cnn", "hidden", ("width", "batchnorm", "dropout")),
        ("resnet18", "dropout", ("width",)),
        ("wrn", "width", ("depth", "widen_factor", "dropout")),
    ],
)
def test_unknown_kwarg_names_it_and_lists_accepted(
    name: str, bad: str, accepted: tuple[str, ...]
) -> None:
    with pytest.raises(ValueError, match=repr(bad)) as info:
        build_model(name, (1, 28, 28), 10, **{bad: 1})
    for kw in accepted:
        assert kw in str(info.value)


def test_hidden_as_comma_string_or_list() -> None:
    torch.manual_seed(1)
    a = build_model("mlp", (12,), 3, hidden="8, 4")
    torch.manual_seed(1)
    b = build_model("mlp", (12,), 3, hidden=[8, 4])
    assert [m.out_features for m in a if isinstance(m, nn.Linear)] == [8, 4, 3]
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert count_parameters(build_model("mlp", (12,), 3, hidden="")) == 12 * 3 + 3
    assert count_parameters(build_model("mlp", (12,), 3, hidden=5)) == mlp_count(12, (5,), 3)
    for bad in ("8,x", "8,-1", [8, 0], [8, True], 2.5):
        with pytest.raises(ValueError, match="hidden"):
            build_model("mlp", (12,), 3, hidden=bad)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "mlp", "input_shape": (), "num_classes": 10}, "input_shape"),
        ({"name": "mlp", "input_shape": (0, 28), "num_classes": 10}, "input_shape"),
        ({"name": "mlp", "input_shape": "28", "num_classes": 10}, "input_shape"),
        ({"name": "mlp", "input_shape": (28,), "num_classes": 0}, "num_classes"),
        ({"name": "mlp", "input_shape": (28,), "num_classes": 10, "dropout": 1.0}, "dropout"),
        ({"name": "mlp", "input_shape": (28,), "num_classes": 10, "activation": "swish"}, "act"),
        ({"name": "mlp", "input_shape": (28,), "num_classes": 10, "batchnorm": "yes"}, "batch"),
        ({"name": "cnn", "input_shape": (63,), "num_classes": 10}, "perfect square"),
        ({"name": "cnn", "input_shape": (1, 3, 3), "num_classes": 10}, "4x4"),
        ({"name": "cnn", "input_shape": (1, 8, 8), "num_classes": 10, "width": 1}, "width"),
        ({"name": "resnet18", "input_shape": (2, 1, 8, 8), "num_classes": 10}, "resnet18"),
        ({"name": "resnet18", "input_shape": (3, 8, 8), "num_classes": 10, "width": 0}, "width"),
        ({"name": "wrn", "input_shape": (3, 8, 8), "num_classes": 10, "dropout": -0.1}, "drop"),
    ],
)
def test_invalid_arguments_raise_value_error(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_model(**kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- external models
@pytest.mark.parametrize("package", ["timm", "torchvision"])
def test_missing_optional_package_says_how_to_install(
    package: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail
    with pytest.raises(ImportError, match=f"pip install {package}"):
        build_model(f"{package}:resnet18", (3, 32, 32), 10)


def test_timm_and_torchvision_are_called_with_the_documented_arguments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, tuple, dict]] = []

    def create_model(*args: object, **kwargs: object) -> nn.Module:
        calls.append(("timm", args, kwargs))
        return nn.Linear(1, 1)

    def get_model(*args: object, **kwargs: object) -> nn.Module:
        calls.append(("torchvision", args, kwargs))
        return nn.Linear(1, 1)

    timm = types.ModuleType("timm")
    timm.create_model = create_model  # type: ignore[attr-defined]
    torchvision = types.ModuleType("torchvision")
    torchvision.models = types.SimpleNamespace(get_model=get_model)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)

    build_model("timm:efficientnet_b0", (1, 28, 28), 10, drop_rate=0.2)
    build_model("torchvision:resnet50", (3, 64, 64), 100)
    assert calls == [
        ("timm", ("efficientnet_b0",), {"num_classes": 10, "in_chans": 1, "drop_rate": 0.2}),
        ("torchvision", ("resnet50",), {"num_classes": 100}),
    ]
    with pytest.raises(ValueError, match="3, H, W"):
        build_model("torchvision:resnet50", (1, 28, 28), 10)


# ----------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("name", MODELS)
def test_deterministic_given_seed(name: str) -> None:
    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return build_model(name, (3, 16, 16), 10, **SMALL_KWARGS[name]).eval()

    a, b, c = make(3), make(3), make(4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(a(x), b(x))


# ----------------------------------------------------------------------------- torch.func
@pytest.mark.parametrize("name", MODELS)
def test_functional_call_under_vmap_matches_modules(name: str) -> None:
    torch.manual_seed(0)
    kwargs = dict(SMALL_KWARGS[name])
    if name in ("mlp", "cnn"):
        kwargs["batchnorm"] = True
    replicas = [build_model(name, (1, 12, 12), 5, **kwargs) for _ in range(3)]
    x = torch.randn(4, 1, 12, 12)
    for r in replicas:  # non-trivial BatchNorm running statistics
        r.train()
        r(x + torch.randn_like(x))
        r.eval()
    params, buffers = stack_module_state(replicas)
    base = replicas[0]

    def f(p: dict, b: dict, inp: torch.Tensor) -> torch.Tensor:
        return functional_call(base, (p, b), (inp,))

    out = torch.vmap(f, in_dims=(0, 0, None))(params, buffers, x)
    expected = torch.stack([r(x) for r in replicas])
    assert_close(out, expected)


# ----------------------------------------------------------------------------- optimisation
def test_cnn_overfits_random_labels() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 1, 8, 8)
    y = torch.randint(0, 10, (256,))
    model = SmallCNN((1, 8, 8), 10, width=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def train_error() -> float:
        with torch.no_grad():
            return (model(x).argmax(1) != y).float().mean().item()

    start = train_error()
    for _ in range(50):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    end = train_error()
    assert start > 0.7  # chance level is 0.9
    assert end < 0.1, f"train error {start:.2f} -> {end:.2f}"


def test_docstring_examples() -> None:
    modules = [fm_models.mlp, fm_models.cnn, fm_models.resnet, fm_models.wide_resnet]
    modules.append(sys.modules["flatminima.models.registry"])
    for module in modules:
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__


# ----------------------------------------------------------------------------- slow: real data
FASHION = Path(os.environ.get("FLATMINIMA_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))


@pytest.mark.slow
@pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").exists(), reason="Fashion-MNIST not found"
)
def test_cnn_fashion_mnist_below_10_percent_in_10_epochs() -> None:
    def idx(name: str, offset: int) -> np.ndarray:
        with gzip.open(FASHION / name) as fh:
            return np.frombuffer(fh.read(), np.uint8, offset=offset)

    def images(name: str) -> torch.Tensor:
        return torch.tensor(idx(name, 16).reshape(-1, 1, 28, 28).astype(np.float32) / 255)

    xtr, xte = images("train-images-idx3-ubyte.gz"), images("t10k-images-idx3-ubyte.gz")
    ytr = torch.tensor(idx("train-labels-idx1-ubyte.gz", 8).astype(np.int64))
    yte = torch.tensor(idx("t10k-labels-idx1-ubyte.gz", 8).astype(np.int64))
    mean, std = xtr.mean(), xtr.std()
    xtr, xte = (xtr - mean) / std, (xte - mean) / std

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    xtr, ytr, xte, yte = (t.to(device) for t in (xtr, ytr, xte, yte))
    torch.manual_seed(0)
    model = build_model("cnn", (1, 28, 28), 10).to(device)
    epochs, batch = 10, 128
    steps = epochs * (len(xtr) // batch)
    opt = torch.optim.SGD(
        model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), device=device)
        for i in range(len(xtr) // batch):
            idx_b = perm[i * batch : (i + 1) * batch]
            opt.zero_grad()
            F.cross_entropy(model(xtr[idx_b]), ytr[idx_b]).backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        wrong = sum(
            (model(xte[i : i + 256]).argmax(1) != yte[i : i + 256]).sum().item()
            for i in range(0, len(xte), 256)
        )
    assert wrong / len(xte) < 0.10


# ----------------------------------------------------------------------------- EfficientNet-B0
# (expand, kernel, stride, channels, blocks) of the reference B0, written out independently.
B0_TABLE = [
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
]


def efficientnet_b0_count(c_in: int, c: int) -> int:
    """Closed form: BN has 2 parameters per channel, convs no bias, SE convs and the head bias."""
    total = 9 * c_in * 32 + 2 * 32  # stem
    cin = 32
    for e, k, _, cout, n in B0_TABLE:
        for _ in range(n):
            hidden, squeeze = cin * e, max(1, cin // 4)
            if e != 1:
                total += cin * hidden + 2 * hidden  # expand 1x1 + BN
            total += k * k * hidden + 2 * hidden  # depthwise + BN
            total += 2 * hidden * squeeze + squeeze + hidden  # squeeze-excitation
            total += hidden * cout + 2 * cout  # project 1x1 + BN
            cin = cout
    return total + 320 * 1280 + 2 * 1280 + 1280 * c + c  # head 1x1 + BN, classifier


def test_efficientnet_b0_published_parameter_count() -> None:
    model = build_model("efficientnet_b0", (3, 224, 224), 1000)
    assert count_parameters(model) == 5_288_548  # Tan & Le (2019), torchvision efficientnet_b0
    assert efficientnet_b0_count(3, 1000) == 5_288_548
    # The CIFAR-size and 1-channel variants differ only in the stem's input and the head.
    assert count_parameters(EfficientNetB0((3, 32, 32), 10)) == efficientnet_b0_count(3, 10)
    assert count_parameters(EfficientNetB0((1, 28, 28), 10)) == efficientnet_b0_count(1, 10)
    # Compound scaling reproduces torchvision's efficientnet_b1 / b2 (width, depth multipliers).
    b1 = EfficientNetB0((3, 240, 240), 1000, width_mult=1.0, depth_mult=1.1)
    b2 = EfficientNetB0((3, 260, 260), 1000, width_mult=1.1, depth_mult=1.2)
    assert (count_parameters(b1), count_parameters(b2)) == (7_794_184, 9_109_994)


def test_efficientnet_b0_structure_and_stem_stride() -> None:
    big = EfficientNetB0((3, 224, 224), 1000)
    cifar = EfficientNetB0((3, 32, 32), 10)
    assert big.stem[0].stride == (2, 2) and cifar.stem[0].stride == (1, 1)
    assert EfficientNetB0((3, 32, 32), 10, stem_stride=2).stem[0].stride == (2, 2)
    big_shapes = {n: p.shape for n, p in big.named_parameters() if not n.startswith("classifier")}
    cifar_shapes = {n: p.shape for n, p in cifar.named_parameters()}
    assert all(cifar_shapes[n] == shape for n, shape in big_shapes.items())  # same body
    blocks = [b for stage in big.stages for b in stage]
    assert [len(stage) for stage in big.stages] == [n for *_, n in B0_TABLE]
    assert all(isinstance(b, MBConv) for b in blocks)
    dw = [m for m in big.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(dw) == 16 and all(m.groups == m.in_channels == m.out_channels for m in dw)
    # SE squeezes to a quarter of the block *input* channels: stage 2 block 1 is 16 -> 96 -> 24.
    se = blocks[1].block[2]
    assert isinstance(se, SqueezeExcitation)
    assert (se.fc1.in_channels, se.fc1.out_channels) == (96, 4)
    assert isinstance(se.act, nn.SiLU) and big.head[1].num_features == 1280
    assert big.dropout.p == 0.2 and big.classifier.in_features == 1280
    # Stochastic depth grows linearly: block i of 16 has rate 0.2 * i / 16 (residual ones only).
    for i, block in enumerate(blocks):
        assert block.residual == (isinstance(block.drop_path, DropPath))
        if block.residual:
            assert block.drop_path.p == pytest.approx(0.2 * i / 16)
    # 28x28 (Fashion-MNIST) and 32x32 (CIFAR) end at 2x2 feature maps with stride 1.
    features = cifar.eval().stages(cifar.stem(torch.zeros(1, 3, 32, 32)))
    assert features.shape == (1, 320, 2, 2)


def test_efficientnet_b0_forward_backward_cifar_and_fashion() -> None:
    torch.manual_seed(0)
    for shape in [(3, 32, 32), (1, 28, 28)]:
        model = build_model("efficientnet_b0", shape, 10)
        x = torch.randn(2, *shape)
        out = model(x)
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        out.square().sum().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_mbconv_residual_branch_by_direct_computation() -> None:
    torch.manual_seed(0)
    block = MBConv(16, 16, 5, 1, 6, drop_path=0.5).eval()
    x = torch.randn(3, 16, 6, 6)
    b = block.block
    h = F.silu(b[0][1](b[0][0](x)))  # expand
    h = F.silu(b[1][1](b[1][0](h)))  # depthwise
    gate = torch.sigmoid(b[2].fc2(F.silu(b[2].fc1(h.mean((2, 3), keepdim=True)))))
    h = b[3][1](b[3][0](h * gate))  # project, no activation
    assert_close(block(x), x + h)  # drop-path is the identity in eval mode
    strided = MBConv(16, 24, 3, 2, 6, drop_path=0.5)
    assert not strided.residual and strided(x).shape == (3, 24, 3, 3)


def test_drop_path_drops_whole_samples_with_the_right_expectation() -> None:
    torch.manual_seed(0)
    p, n = 0.3, 20_000
    drop = DropPath(p)
    x = torch.rand(n, 2, 3, 3) + 0.5  # no zeros
    assert torch.equal(drop.eval()(x), x)
    y = drop.train()(x)
    ratio = (y / x).reshape(n, -1)
    dropped = (ratio == 0).all(1)
    kept = (ratio - 1 / (1 - p)).abs().max(1).values < 1e-5
    assert bool((dropped | kept).all())  # every sample is either zeroed or scaled by 1/(1-p)
    se = math.sqrt(p * (1 - p) / n)
    assert abs(dropped.float().mean().item() - p) < 5 * se
    # E[y] = x: the mean of y/x over samples is 1 within five standard errors.
    assert abs(ratio[:, 0].mean().item() - 1) < 5 * math.sqrt(p / (1 - p) / n)
    assert torch.equal(DropPath(0.0).train()(x), x)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width_mult": 0}, "width_mult"),
        ({"depth_mult": -1.0}, "depth_mult"),
        ({"drop_path": 1.0}, "drop-path"),
        ({"dropout": 1.5}, "dropout"),
        ({"stem_stride": 3}, "stem_stride"),
    ],
)
def test_efficientnet_invalid_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_model("efficientnet_b0", (3, 32, 32), 10, **kwargs)


def test_efficientnet_docstring_examples() -> None:
    result = doctest.testmod(fm_models.efficientnet, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_cli_trains_efficientnet_b0_on_digits(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from flatminima.cli import main
    from flatminima.train import TrainConfig, Trainer, load_run

    out = tmp_path / "run"
    args = ["train", "--data", "digits", "--model", "efficientnet_b0", "--train-subset", "128"]
    args += ["--batch-size", "32", "--epochs", "1", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    assert "efficientnet_b0" in capsys.readouterr().out
    trained = load_run(out).algo.model
    fresh = Trainer(TrainConfig.from_yaml(out / "config.yaml"), None, progress=False).algo.model
    assert isinstance(trained, EfficientNetB0) and trained.stem_stride == 1
    assert count_parameters(trained) == efficientnet_b0_count(1, 10)
    with open(out / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert int(rows[-1]["samples"]) == 128 and math.isfinite(float(rows[-1]["train_loss"]))
    moved = [n for n, p in trained.named_parameters() if not torch.equal(p, fresh.get_parameter(n))]
    assert len(moved) == len(list(trained.parameters()))  # SGD updated every parameter
    stats = trained.stem[1].running_mean
    assert not torch.equal(stats, torch.zeros_like(stats))  # BatchNorm statistics were tracked
