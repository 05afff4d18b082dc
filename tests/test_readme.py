"""The README's Python example runs as written (keeps the README true)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102
    assert namespace["test_error"] < 0.2  # the rSGD centre learnt the digits
    le = namespace["le"]
    assert le.delta_error[-1] > le.delta_error[0]  # stronger noise, larger increase
    assert namespace["esgd"].grad_evals == 20


def test_readme_quick_start_matches_ci():
    text = README.read_text()
    assert "bash scripts/quickstart.sh" in text and "bash scripts/test.sh" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci
