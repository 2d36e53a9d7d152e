"""Property-test kit for preconditioners and optimizers (``pip install -e ".[testing]"``).

One entry point, :func:`check_all` (:mod:`~gnopt.testing.kit`), runs every
check on an optimizer or a preconditioner and reports pass / fail / n/a per
check with a one-line reason; ``docs/testing.md`` says what each proves.
Underneath: problems with known structure (:mod:`~gnopt.testing.problems`),
hypothesis strategies drawing them (:mod:`~gnopt.testing.strategies`), and the
optimizer contract every gnopt transform passes (:mod:`~gnopt.testing.contract`)::

    import optax
    from hypothesis import given
    import gnopt.testing as gt

    def test_my_preconditioner():  # my_preconditioner() returns P g; the kit adds −lr
        gt.check_all(my_preconditioner, mode="preconditioner", reference="adagrad",
                     invariances=("gradient_scale", "permutation"))

    @gt.ci_settings  # no Hypothesis deadline: every example compiles
    @given(gt.quadratics())
    def test_descends(problem):  # check_preconditioner wants a whole optimizer
        gt.check_preconditioner(lambda: my_optimizer(1e-1), problem, steps=50)
"""

from gnopt.testing.contract import (
    DescentReport,
    check_optimizer_contract,
    check_preconditioner,
)
from gnopt.testing.kit import (
    CHECKS,
    INVARIANCES,
    CheckResult,
    KitFailure,
    KitReport,
    check_all,
    ci_settings,
    newton,
    register_profiles,
    thorough_settings,
)
from gnopt.testing.problems import (
    AbstractProblem,
    DenseQuadratic,
    LeastSquares,
    Logistic,
    Quadratic,
    SmallMLP,
    dense_apply,
    linear_apply,
    mlp_apply,
)
from gnopt.testing.strategies import least_squares, logistic_problems, mlp_problems, quadratics

__all__ = [
    "AbstractProblem", "CHECKS", "CheckResult", "DenseQuadratic", "DescentReport", "INVARIANCES",
    "KitFailure", "KitReport", "LeastSquares", "Logistic", "Quadratic", "SmallMLP", "check_all",
    "check_optimizer_contract", "check_preconditioner", "ci_settings", "dense_apply",
    "least_squares", "linear_apply", "logistic_problems", "mlp_apply", "mlp_problems", "newton",
    "quadratics", "register_profiles", "thorough_settings",
]
