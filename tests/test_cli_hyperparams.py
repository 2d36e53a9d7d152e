"""Issue 15 item 2 from the command line: a bad optimizer hyper-parameter is refused at
construction, before any step, with one line naming the builder, the argument and the value."""

import pytest
import tiny_cli
from test_cli_user import cache, gnopt_train, message, shards  # noqa: F401  (fixtures)


@pytest.mark.parametrize("gin_file, binding, expected", [
    ("tiny_gn_layerwise.gin", "gnopt.solvers.inner_muon.learning_rate = -0.01",
     "inner_muon: learning_rate must be a finite number >= 0, got -0.01 (float)"),
    ("tiny_gn_layerwise.gin", 'gnopt.solvers.inner_muon.learning_rate = "0.01"',
     "inner_muon: learning_rate must be a finite number >= 0, got '0.01' (str)"),
    ("tiny_gn_cg.gin", "gnopt.solvers.cg.max_iters = 0",
     "cg: max_iters must be an integer >= 1, got 0 (int)"),
])
def test_a_bad_hyperparameter_is_one_line_before_any_step(tmp_path, shards, cache, gin_file,  # noqa: F811
                                                          binding, expected):
    """``python -m gnopt.train --gin_file gin/tiny_gn_layerwise.gin --run_dir R --gin_param
    'gnopt.solvers.inner_muon.learning_rate = -0.01'`` → exit 2, ``gnopt.train: config error:
    inner_muon: learning_rate must be a finite number >= 0, got -0.01 (float) ...``."""
    run = tmp_path / "run"
    proc = gnopt_train(*tiny_cli.argv(gin_file, run, shards, binding), cache=cache)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = message(proc)
    assert line.startswith("gnopt.train: config error: ") and expected in line, line
    assert not (run / "metrics.jsonl").exists()
