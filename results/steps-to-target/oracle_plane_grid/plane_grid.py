"""Oracle (not kept): PI-Muon's plane step, then a grid line search along it."""
import gin
import optax
import gnopt
from gnopt.requirements import requires
from gnopt.transforms.line_search_step import scale_by_line_search


@gin.configurable
def plane_grid(apply_fn, loss_fn, inner=gin.REQUIRED, num=10, scale=4.0):
    tx = inner(apply_fn, loss_fn)
    return optax.chain(tx, scale_by_line_search(apply_fn, loss_fn, gnopt.line_search.grid(num=num, scale=scale)))


requires("apply_fn", "loss_fn", whole_batch=True, own_gradient=True)(plane_grid)
