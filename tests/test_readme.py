"""Issue 18 item 3: the README's "In code" script runs verbatim (as a new user pastes it);
the "Test your own preconditioner" section has its own test (tests/test_kit_readme.py)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    """The ```python blocks of the README's "## In code" section."""
    text = README.read_text()
    start = text.index("## In code")
    end = text.find("\n## ", start + 1)
    return re.findall(r"^```python\n(.*?)^```", text[start:end if end > 0 else None],
                      re.S | re.M)


def test_readme_has_a_complete_in_code_example():
    blocks = _python_blocks()
    assert blocks, "no ```python block in README.md"
    assert any("train_step" in block and "tx.init" in block for block in blocks)


@pytest.mark.slow
def test_readme_python_blocks_run_verbatim(capsys):
    """Each block runs in a fresh namespace; the script's loss falls."""
    for number, block in enumerate(_python_blocks()):
        exec(compile(block, f"README.md python block {number}", "exec"), {"__name__": "__main__"})
    losses = [float(x) for x in re.findall(r"loss ([\d.]+) nats/token", capsys.readouterr().out)]
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.5, losses
