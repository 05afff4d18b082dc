"""The README's Recipes (plain loop, Lightning, Hugging Face Trainer) run as written.

A recipe is a ```python block of README.md whose first line is ``# recipe: NAME``. Each runs in a
fresh namespace from a temporary working directory; the checks below are on the variables the
recipe leaves behind (every optimizer learnt the toy task; the budget accounting is as stated).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
NAMES = ("plain", "lightning", "hf")


def recipes() -> dict[str, str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    out = {}
    for block in blocks:
        m = re.match(r"# recipe: (\w+)\n", block)
        if m:
            assert m.group(1) not in out, f"two recipes named {m.group(1)!r}"
            out[m.group(1)] = block
    return out


def run(name: str, tmp_path, monkeypatch) -> dict:
    code = recipes()[name]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"readme_recipe_{name}"}
    exec(compile(code, f"{README}:recipe:{name}", "exec"), namespace)  # noqa: S102
    return namespace


def test_readme_has_the_three_recipes_after_the_python_api_example():
    text = README.read_text()
    assert set(recipes()) == set(NAMES)
    first = text.index("```python\n")
    assert "# recipe:" not in text[first : text.index("```", first + 10)]  # test_readme's block


def test_plain_recipe(tmp_path, monkeypatch):
    ns = run("plain", tmp_path, monkeypatch)
    assert min(ns["esgd_acc"], ns["sam_acc"], ns["rsgd_acc"]) > 0.75
    assert ns["esgd"].grad_evals == 2 * 15  # one per minibatch: 2 epochs of 15
    assert ns["esgd"].outer_steps == 6
    assert ns["sam"].grad_evals == 2 * 2 * 15
    assert ns["rsgd"].grad_evals == 2 * 5 * 3  # 5 batches of 3*32 per epoch = 15 minibatches


def test_lightning_recipe(tmp_path, monkeypatch):
    pytest.importorskip("lightning.pytorch")
    ns = run("lightning", tmp_path, monkeypatch)
    assert min(ns["acc"].values()) > 0.75


def test_hf_recipe(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    ns = run("hf", tmp_path, monkeypatch)
    assert min(ns["esgd_acc"], ns["sam_acc"], ns["rsgd_acc"]) > 0.75
    assert ns["rsgd"].grad_evals == 2 * 5 * 3
