"""Issue 15 items 10 and 12 from the shell: ``python -m gnopt.bench`` never touches the
committed results, and no tracked file speaks of the development tool's working periods
(figures are keyed to commits, dates, machines and commands instead)."""

import os
import subprocess
import sys

import pytest
from test_bench import IN_GIT, ROOT, _results_state


def bench(*args, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TMPDIR": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "gnopt.bench", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def test_a_full_run_refuses_a_committed_result_in_one_line(tmp_path):
    """``python -m gnopt.bench cost`` in the checkout → exit 2, ``... results/cost/cost.json
    exists: pass --overwrite ...``, before any compute."""
    before = _results_state()
    proc = bench("cost", tmp_path=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "results/cost/cost.json exists: pass --overwrite" in lines[0], lines
    assert _results_state() == before


def test_a_smoke_run_writes_to_a_temporary_folder(tmp_path):
    """``python -m gnopt.bench nls --smoke`` → exit 0; results/ unchanged; the output lies
    under $TMPDIR."""
    before = _results_state()
    proc = bench("nls", "--smoke", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _results_state() == before
    assert list(tmp_path.glob("gnopt-bench-nls-smoke-*/*.json"))


@pytest.mark.skipif(not IN_GIT, reason="needs the git checkout")
def test_no_tracked_file_names_a_working_period():
    """``git grep -n -i -w -E 'se''ssions?'`` finds nothing a reader would have to decode."""
    word = "se" + "ssions?"
    proc = subprocess.run(["git", "-C", str(ROOT), "grep", "-n", "-i", "-w", "-E", word],
                          capture_output=True, text=True)
    assert proc.stdout == "", proc.stdout[:2000]
