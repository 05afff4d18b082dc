"""Typed configuration (issue 16, item 1): every source of a setting goes through one converter.

Sources: ``TrainConfig(...)``, ``TrainConfig.from_dict``, ``--config FILE.yaml``, presets, grids,
command-line flags and ``--set KEY=VALUE``. The truths checked are Python's own ``float()`` /
``int()`` of the written text, and the rule that a bad value is one line naming key and value.
"""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flatminima.studies.presets import Preset, arm_config, load_preset, parse_grid
from flatminima.train.config import (
    ConfigError,
    TrainConfig,
    coerce,
    config_keys,
    load_yaml_file,
    parse_override,
)

FLOAT_TEXTS = ["1e-3", "1E-3", ".5", "5.", "+2.5e+1", " 0.25 ", "3"]
FLOAT_KEYS = [
    k for k, h in typing.get_type_hints(TrainConfig).items() if h is float and k != "mu_decay"
]


def _one_line_naming(err: BaseException, *words: str) -> None:
    text = str(err)
    assert "\n" not in text and text.strip() == text and text
    for w in words:
        assert w in text, (w, text)


# ----------------------------------------------------------------------- numbers as text


@pytest.mark.parametrize("text", FLOAT_TEXTS)
def test_float_texts_parse_from_every_source(text, tmp_path):
    want = float(text)
    assert TrainConfig(lr=text).lr == want
    assert TrainConfig.from_dict({"lr": text}).lr == want
    (tmp_path / "c.yaml").write_text(f"lr: {text.strip()}\ngamma_max: {text.strip()}\n")
    cfg = TrainConfig.from_yaml(tmp_path / "c.yaml")
    assert cfg.lr == want and cfg.gamma_max == want
    key, raw = parse_override(f"lr={text}")
    assert TrainConfig.from_dict({key: raw}).lr == want
    preset = Preset.from_dict({"common": {"lr": text}, "sgd": {"weight_decay": text}})
    assert preset.common["lr"] == want  # converted when the preset is read, not later
    assert arm_config(preset, "sgd").weight_decay == want


def test_yaml_reads_1e3_as_a_string_and_the_config_still_gets_a_float(tmp_path):
    import yaml

    assert yaml.safe_load("lr: 1e-3")["lr"] == "1e-3"  # the YAML 1.1 pitfall this guards
    (tmp_path / "c.yaml").write_text("lr: 1e-3\ngamma: 1E-2\nepochs: 5.\nmomentum: .5\n")
    cfg = TrainConfig.from_yaml(tmp_path / "c.yaml")
    assert (cfg.lr, cfg.gamma, cfg.epochs, cfg.momentum) == (1e-3, 1e-2, 5.0, 0.5)
    assert all(isinstance(v, float) for v in (cfg.lr, cfg.gamma, cfg.epochs, cfg.momentum))


def test_ints_accept_whole_numbers_only():
    assert TrainConfig(batch_size="64").batch_size == 64
    assert TrainConfig(batch_size=64.0).batch_size == 64
    assert TrainConfig(train_eval_samples="1e3").train_eval_samples == 1000
    for bad in (64.5, "64.5", "sixty", True, [64]):
        with pytest.raises(ConfigError) as info:
            TrainConfig(batch_size=bad)
        _one_line_naming(info.value, "batch_size", "whole number")


# ----------------------------------------------------------------------- refused values


@pytest.mark.parametrize(
    "key,value,words",
    [
        ("momentum", True, ["momentum", "boolean"]),
        ("momentum", "true", ["momentum", "boolean"]),
        ("lr", "nan", ["lr", "not finite"]),
        ("lr", float("inf"), ["lr", "not finite"]),
        ("lr", "-inf", ["lr"]),
        ("lr", 0, ["lr", "> 0"]),
        ("lr", [0.1], ["lr", "list"]),
        ("seed", -1, ["seed", "4294967295"]),
        ("seed", 2**64, ["seed", "4294967295"]),
        ("optimizer", "adam", ["optimizer", "sgd, esgd, rsgd, sam"]),
        ("augment", "maybe", ["augment", "true or false"]),
        ("augment", 1, ["augment", "true or false"]),
        ("data_root", 5, ["data_root", "string"]),
        ("model_kwargs", "[1", ["model_kwargs", "NAME=VALUE"]),
        ("model_kwargs", "{a: [", ["model_kwargs", "YAML"]),
        ("flatness_sigmas", "0.1,x", ["flatness_sigmas", "'x'"]),
        ("flatness_sigmas", "-0.1", ["flatness_sigmas", ">= 0"]),
        ("lr_milestones", "0.5,1.5", ["lr_milestones", "(0, 1)"]),
        ("label_noise", 1.0, ["label_noise", "[0, 1)"]),
        ("val_size", 10.5, ["val_size", "whole number"]),
        ("gamma", 1e39, ["gamma", "3.4e38"]),
        ("flatness_samples", 0, ["flatness_samples", ">= 1"]),  # was "data is empty" mid-run
    ],
)
def test_bad_values_one_line_naming_key_value_and_valid(key, value, words):
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict({key: value})
    _one_line_naming(info.value, *words)
    assert "valid" in str(info.value)


def test_cross_key_errors_name_both_keys():
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict({"gamma": 1.0, "gamma_growth": 1e300, "optimizer": "rsgd"})
    _one_line_naming(info.value, "gamma_growth", "gamma=1.0", "float32")
    # a cap makes the same growth fine (the scheduler never exceeds gamma_max)
    cfg = TrainConfig.from_dict({"gamma": 1.0, "gamma_growth": 1e300, "gamma_max": 10})
    assert cfg.gamma_max == 10.0
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict({"nesterov": "yes", "momentum": "0"})
    _one_line_naming(info.value, "nesterov", "momentum")


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict({"learning_rat": 0.1})
    with pytest.raises(ConfigError) as info:
        parse_override("gama=0.1")
    _one_line_naming(info.value, "'gama'", "did you mean gamma")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("lr")
    with pytest.raises(ConfigError, match="did you mean seed"):
        TrainConfig().replace(seeds=3)
    assert TrainConfig().replace(seed="3").seed == 3


# ----------------------------------------------------------------------- lists and mappings


def test_list_keys_from_every_form():
    want = [0.1, 0.2]
    for value in ("0.1,0.2", "[0.1, 0.2]", " 0.1 , 0.2 ", [0.1, 0.2], ("1e-1", "2e-1")):
        assert TrainConfig.from_dict({"flatness_sigmas": value}).flatness_sigmas == want
    assert TrainConfig.from_dict({"flatness_sigmas": 0.3}).flatness_sigmas == [0.3]
    assert TrainConfig.from_dict({"flatness_epochs": "1,5,-1"}).flatness_epochs == [1, 5, -1]
    assert TrainConfig.from_dict({"flatness_epochs": ""}).flatness_epochs == []
    assert coerce("model_kwargs", "width=16,batchnorm=true") == {"width": 16, "batchnorm": True}
    assert coerce("model_kwargs", "{width: 16}") == {"width": 16}
    assert coerce("data_kwargs", "null") == {}
    want = {"num_train": 2000, "delta": 0.1}
    assert coerce("data_kwargs", "num_train=2000,delta=1e-1") == want  # YAML 1.1: "1e-1" is text
    assert coerce("data_kwargs", "{num_train: 2000, delta: 1e-1}") == want
    assert coerce("data_kwargs", {"num_train": 2000, "delta": "1e-1"}) == want


def test_optional_keys_take_null_words():
    for word in ("null", "None", "~", "", None):
        assert TrainConfig.from_dict({"grad_clip": word, "gamma_max": word}).gamma_max is None
    assert TrainConfig.from_dict({"data_root": "/tmp/x"}).data_root == "/tmp/x"


def test_round_trip_to_dict_is_identity():
    cfg = TrainConfig.from_dict({"lr": "1e-3", "flatness_sigmas": "0.1,0.2", "seed": "3"})
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


# ----------------------------------------------------------------------- YAML files


def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.1\nmodel: [mlp\n  width: 3\n")
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_yaml(bad)
    _one_line_naming(info.value, f"{bad}:3:", "malformed YAML")
    with pytest.raises(ConfigError) as info:
        load_preset(bad)
    _one_line_naming(info.value, f"{bad}:3:")
    (tmp_path / "bin.yaml").write_bytes(b"lr: \xff\xfe\n")
    with pytest.raises(ConfigError, match="bin.yaml"):
        load_yaml_file(tmp_path / "bin.yaml")
    with pytest.raises(FileNotFoundError, match="folder"):
        load_yaml_file(tmp_path)


def test_yaml_file_bad_value_names_the_file(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: true\n")
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_yaml(tmp_path / "c.yaml")
    _one_line_naming(info.value, "c.yaml", "lr", "True", "boolean")
    (tmp_path / "l.yaml").write_text("- lr\n")
    with pytest.raises(ConfigError, match="mapping"):
        TrainConfig.from_yaml(tmp_path / "l.yaml")


def test_preset_bad_value_names_section(tmp_path):
    with pytest.raises(ConfigError) as info:
        Preset.from_dict({"common": {"lr": True}}, source="p.yaml")
    _one_line_naming(info.value, "lr", "common in p.yaml")
    with pytest.raises(ConfigError) as info:
        Preset.from_dict({"rsgd": {"num_replicas": "three"}})
    _one_line_naming(info.value, "num_replicas", "arm 'rsgd'")


def test_grid_values_are_converted_per_key():
    grid = parse_grid("lr=1e-3,.5;seed=1,2;augment=true,false")
    assert grid == {"lr": [1e-3, 0.5], "seed": [1, 2], "augment": [True, False]}
    assert parse_grid({"lr": ["1e-3", 0.1]}) == {"lr": [1e-3, 0.1]}
    with pytest.raises(ConfigError, match="lr"):
        parse_grid("lr=true")
    with pytest.raises(ValueError, match="learning_rate"):
        parse_grid("learning_rate=0.1")


# ----------------------------------------------------------------------- property-based

_HINTS = typing.get_type_hints(TrainConfig)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["1e-3", ".5", "5.", "nan", "inf", "true", "null", "0.1,0.2", "[1, 2]", "{a"]),
)
_values = st.one_of(
    _scalars, st.lists(_scalars, max_size=3), st.dictionaries(st.text(max_size=4), _scalars)
)
_keys = st.one_of(st.sampled_from(config_keys()), st.text(max_size=10))


def _type_ok(key: str, value: object) -> bool:
    hint = _HINTS[key]
    origin = typing.get_origin(hint)
    if origin is list:
        (inner,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok_scalar(inner, v) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args:
        return value is None or _type_ok_scalar(args[0], value)
    return _type_ok_scalar(hint, value)


def _type_ok_scalar(kind: type, value: object) -> bool:
    if kind is float:
        return type(value) is float and math.isfinite(value)
    return type(value) is kind


@settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.dictionaries(_keys, _values, max_size=3))
def test_property_any_mapping_gives_a_typed_config_or_one_error_line(values):
    try:
        cfg = TrainConfig.from_dict(values)
    except ValueError as err:  # ConfigError, or a cross-key rule
        _one_line_naming(err)
        return
    for f in dataclasses.fields(cfg):
        assert _type_ok(f.name, getattr(cfg, f.name)), (f.name, getattr(cfg, f.name))
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_every_shipped_preset_gives_valid_typed_configs():
    import yaml

    from flatminima.studies.presets import list_presets, packaged_presets_dir

    checked = 0
    for name in list_presets():
        path = packaged_presets_dir() / f"{name}.yaml"
        if not path.is_file() or "grid" in (yaml.safe_load(path.read_text()) or {}):
            continue  # a study grid, not a preset
        preset = load_preset(path)
        for arm in preset.arms:
            cfg = arm_config(preset, arm)
            assert isinstance(cfg.lr, float) and isinstance(cfg.batch_size, int)
            checked += 1
    assert checked >= 10
