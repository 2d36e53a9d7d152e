"""gin names of everything a training config refers to.

Importing this module registers, under the names used in ``gin/*.gin``:

* ``optax.<name>``: optax optimizers and schedules (``optax.adamw``, ...);
* ``gnopt.<name>``: ``gnopt.gauss_newton``, ``gnopt.pi_muon``, ``gnopt.fuse``;
* ``gnopt.control.<name>``: PI controllers (PI-Muon's fusion weight, damping);
* ``gnopt.transforms.<name>``: baselines and their schedules;
* ``gnopt.solvers.<name>``, ``gnopt.curvature.<name>``,
  ``gnopt.line_search.<name>``, ``gnopt.schedules.<name>``;
* ``gnopt.models.<name>``: ``LLaMA``, ``llama_config``, ``MLP``;
* ``gnopt.data.<name>``: token sources;
* ``gnopt.distributed.initialize``: multi-host start-up (``python -m gnopt.train``
  calls it when any of its arguments is bound, see ``docs/multihost.md``);
* constants ``%gnopt.losses.softmax_cross_entropy`` and
  ``%gnopt.losses.mean_squared_error``.

Builders are referenced without ``()`` when the trainer calls them
(``train.optimizer = @optax.adamw``) and with ``()`` when gin should call them
while building (``optax.adamw.learning_rate = @gnopt.transforms.warmup_cosine()``).
"""

from __future__ import annotations

from collections.abc import Callable

import optax

import gin
import gnopt
from gnopt import (
    control,
    curvature,
    data,
    distributed,
    line_search,
    losses,
    models,
    schedules,
    solvers,
    transforms,
)
from gnopt.transforms.pi_muon import pi_muon

CONFIGURABLES: dict[str, Callable] = {}
"""Full gin name -> the gin-wrapped callable (its calls apply the gin bindings)."""


def _register(module: str, objects: dict[str, Callable]) -> None:
    for name, obj in objects.items():
        CONFIGURABLES[f"{module}.{name}"] = gin.external_configurable(obj, name=name, module=module)


_register("optax", {
    "adam": optax.adam, "adamw": optax.adamw, "sgd": optax.sgd, "lion": optax.lion,
    "clip_by_global_norm": optax.clip_by_global_norm,
    "constant_schedule": optax.constant_schedule,
    "cosine_decay_schedule": optax.cosine_decay_schedule,
    "linear_schedule": optax.linear_schedule,
    "warmup_cosine_decay_schedule": optax.warmup_cosine_decay_schedule,
})
_register("optax.contrib", {"muon": optax.contrib.muon})
_register("gnopt", {"gauss_newton": gnopt.gauss_newton, "pi_muon": pi_muon, "fuse": gnopt.fuse})
_register("gnopt.control", {"fusion_weight_controller": control.fusion_weight_controller,
                            "damping_controller": control.damping_controller})
_register("gnopt.transforms", {
    name: getattr(transforms, name)
    for name in ("adamw", "lion", "muon", "soap", "shampoo", "kfac", "constant", "ramp", "warmup_cosine")
})
_register("gnopt.solvers", {
    "cg": solvers.cg, "inner_optimizer": solvers.inner_optimizer,
    "prox_linear": solvers.prox_linear, "inner_adamw": solvers.inner_adamw,
    "inner_muon": solvers.inner_muon,
})
_register("gnopt.curvature", {"full": curvature.full, "layerwise": curvature.layerwise})
_register("gnopt.line_search", {"grid": line_search.grid,
                                "backtracking": line_search.backtracking})
_register("gnopt.schedules", {"inner_cosine": schedules.inner_cosine})
_register("gnopt.models", {"LLaMA": models.LLaMA, "llama_config": models.llama_config,
                           "MLP": models.MLP})
_register("gnopt.data", {"stdlib_corpus": data.stdlib_corpus, "text_files": data.text_files,
                         "token_shards": data.token_shards})
_register("gnopt.distributed", {"initialize": distributed.initialize})
gin.constant("gnopt.losses.softmax_cross_entropy", losses.softmax_cross_entropy)
gin.constant("gnopt.losses.mean_squared_error", losses.mean_squared_error)
