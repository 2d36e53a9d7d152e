"""Property-test kit for preconditioners and optimizers.

Problems with known structure (:mod:`~gnopt.testing.problems`), hypothesis
strategies drawing them (:mod:`~gnopt.testing.strategies`), and the checks
every gnopt optimizer passes (:mod:`~gnopt.testing.contract`)::

    from hypothesis import given
    import gnopt.testing as gt

    def test_contract():
        gt.check_optimizer_contract(my_optimizer, {"w": jnp.ones((3, 2))},
                                    hyperparams={"learning_rate": 1e-3})

    @given(gt.quadratics())
    def test_descends(problem):
        gt.check_preconditioner(lambda: my_optimizer(1e-1), problem, steps=50)
"""

from gnopt.testing.contract import (
    DescentReport,
    check_optimizer_contract,
    check_preconditioner,
)
from gnopt.testing.problems import (
    AbstractProblem,
    LeastSquares,
    Logistic,
    Quadratic,
    SmallMLP,
    linear_apply,
    mlp_apply,
)
from gnopt.testing.strategies import least_squares, logistic_problems, mlp_problems, quadratics

__all__ = [
    "AbstractProblem", "DescentReport", "LeastSquares", "Logistic", "Quadratic", "SmallMLP",
    "check_optimizer_contract", "check_preconditioner", "least_squares", "linear_apply",
    "logistic_problems", "mlp_apply", "mlp_problems", "quadratics",
]
