"""The kit (``gnopt.testing.check_all``) run on every optimizer gnopt ships.

The expected verdicts are the table of ``docs/testing.md``. The optimizer
contract is left out here (``tests/test_contract.py`` runs it on every
optimizer). CI runs the optimizers marked ``ci``; set
``GNOPT_TESTING_ALL_OPTIMIZERS=1`` to run all thirteen (about a minute of CPU).
"""

import os

import pytest

import gnopt
import gnopt.testing as gt

CHECKS = tuple(c for c in gt.CHECKS if c != "contract")
ALL = bool(os.environ.get("GNOPT_TESTING_ALL_OPTIMIZERS"))


def _gn(**kwargs):
    return lambda problem: gnopt.gauss_newton(problem.apply_fn, problem.loss_fn, **kwargs)


P, F, NA = "pass", "fail", "n/a"
# name: (in CI, make_tx, check_all arguments, expected status of every check)
OPTIMIZERS = {
    "adamw": (True, lambda: gnopt.adamw(0.1, weight_decay=0.0),
              dict(reference="adam", descent_steps=1,
                   invariances=("gradient_scale", "permutation", "rotation")),
              dict(descent=P, reference=P, edge_cases=P, **{
                  "invariance:gradient_scale": P, "invariance:permutation": P,
                  "invariance:rotation": F})),
    "lion": (True, lambda: gnopt.lion(0.1),
             dict(reference="adam", tol=1e-2, descent_steps=1,
                  invariances=("gradient_scale", "permutation")),
             dict(descent=P, reference=P, edge_cases=P, **{
                 "invariance:gradient_scale": P, "invariance:permutation": P})),
    "muon": (True, lambda: gnopt.muon(0.1),
             dict(reference="adam", tol=1e-2, descent_steps=1,
                  invariances=("gradient_scale", "rotation")),
             dict(descent=P, reference=P, edge_cases=P, **{
                 "invariance:gradient_scale": P, "invariance:rotation": P})),
    "soap": (False, lambda: gnopt.soap(0.1),
             dict(reference="adam", tol=1e-2, descent_steps=1, allow_zero_steps=True,
                  invariances=("gradient_scale", "rotation")),
             dict(descent=P, reference=P, edge_cases=P, **{
                 "invariance:gradient_scale": F, "invariance:rotation": F})),
    "shampoo": (False, lambda: gnopt.shampoo(0.1),
                dict(reference="adam", descent_steps=1, invariances=("gradient_scale", "rotation")),
                dict(descent=P, reference=P, edge_cases=P, **{
                    "invariance:gradient_scale": P, "invariance:rotation": F})),
    "kfac": (False, lambda problem: gnopt.kfac(problem.apply_fn, problem.loss_fn, 1.0,
                                               momentum=0.0, damping=1e-9),
             dict(params="dense", reference="sgd", invariances=("rotation", "condition")),
             dict(descent=P, reference=P, edge_cases=P, **{
                 "invariance:rotation": P, "invariance:condition": P})),
    "gn_full": (True, _gn(),
                dict(reference="newton", invariances=("rotation", "condition")),
                dict(descent=P, reference=P, edge_cases=NA, **{
                    "invariance:rotation": P, "invariance:condition": P})),
    "gn_layerwise": (False, _gn(curvature=gnopt.curvature.layerwise(),
                                line_search=gnopt.line_search.grid(5)),
                     dict(reference="newton", allow_zero_steps=True,
                          invariances=("rotation", "condition")),
                     dict(descent=P, reference=P, edge_cases=NA, **{
                         "invariance:rotation": P, "invariance:condition": P})),
    "gn_layerwise_inner_muon": (False, _gn(
        curvature=gnopt.curvature.layerwise(), line_search=gnopt.line_search.grid(5),
        solver=gnopt.solvers.inner_optimizer(gnopt.inner_muon(1e-2), 6)),
        dict(reference="adam", allow_zero_steps=True, invariances=("rotation", "condition")),
        dict(descent=P, reference=F, edge_cases=NA, **{
            "invariance:rotation": P, "invariance:condition": F})),
    "gn_levenberg_marquardt": (False, _gn(damping=gnopt.control.nielsen_damping()),
                               dict(reference="newton", allow_zero_steps=True,
                                    invariances=("rotation", "condition")),
                               dict(descent=P, reference=P, edge_cases=NA, **{
                                   "invariance:rotation": P, "invariance:condition": P})),
    # The plane (pi_muon's default fusion) misses the kit's relative condition rule by being
    # fast at condition 10: 4 steps there (the interpolation: 6) and 12 at 1e4 (the
    # interpolation: 13), where CG's 10 iterations no longer solve the GN system.
    "pi_muon": (True, lambda problem: gnopt.pi_muon(problem.apply_fn, problem.loss_fn, 0.02),
                dict(reference="adam", allow_zero_steps=True,
                     invariances=("rotation", "condition")),
                dict(descent=P, reference=P, edge_cases=NA, **{
                    "invariance:rotation": P, "invariance:condition": F})),
    "pi_muon_interpolate": (False, lambda problem: gnopt.pi_muon(
        problem.apply_fn, problem.loss_fn, 0.02, parallel="interpolate"),
        dict(reference="adam", allow_zero_steps=True, invariances=("rotation", "condition")),
        dict(descent=P, reference=P, edge_cases=NA, **{
            "invariance:rotation": P, "invariance:condition": P})),
    # On the plane SOAP's part stays in every step, and SOAP is not rotation invariant
    # (its row above); the condition rule as for pi_muon.
    "fuse_soap": (True, lambda problem: gnopt.fuse(gnopt.soap(0.02), problem.apply_fn,
                                                   problem.loss_fn),
                  dict(reference="adam", allow_zero_steps=True,
                       invariances=("rotation", "condition")),
                  dict(descent=P, reference=P, edge_cases=NA, **{
                      "invariance:rotation": F, "invariance:condition": F})),
}


def run(name):
    _, make_tx, arguments, _ = OPTIMIZERS[name]
    return gt.check_all(make_tx, checks=CHECKS, raise_on_failure=False, **arguments)


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=() if ci or ALL else pytest.mark.skip(
        reason="set GNOPT_TESTING_ALL_OPTIMIZERS=1 to run every optimizer"))
    for name, (ci, *_) in OPTIMIZERS.items()])
def test_kit_on_gnopt_optimizer(name):
    report = run(name)
    expected = {"purity": P, "psd": NA} | OPTIMIZERS[name][3]
    assert report.statuses == expected, f"{name}:\n{report}"


if __name__ == "__main__":  # prints the table of docs/testing.md
    for name in OPTIMIZERS:
        print(f"== {name}\n{run(name)}\n")
