"""The SOAP authors' update in float64 NumPy, to test ``gnopt.soap`` against.

A transcription, written for these tests, of what ``SOAP.step`` in
``soap.py`` of github.com/nikhilvyas/SOAP does (branch ``master``, commit
a1e5535 of 2 Dec 2024, the file as of its commit f42d296 "momentum change"):
the same state (``exp_avg`` kept in the *rotated* basis and carried back and
forth around every factor update, ``exp_avg_sq`` permuted at each QR
refresh, ``GG`` as an EMA started from zeros by ``lerp``), the same order of
operations within a step, the same options (``merge_dims``,
``precondition_1d``, ``normalize_grads``, ``correct_bias``,
``max_precond_dim``), and the same ``step`` counter. It only replaces torch
by NumPy; ``data_format`` is left out (a PyTorch memory layout).

One hook the original lacks: ``step(grads, first_bases=fn)`` takes the
eigenbases of the initialising call from ``fn(name, GG)`` (``GG`` the list of
first factors, ``None`` where an axis has none) instead of this file's ``eigh``.
Where the first ``G Gᵀ`` is rank-deficient (any non-square matrix, any
vector) its null space has a repeated zero eigenvalue, so *which* orthonormal
basis of it ``eigh`` returns is arbitrary (float32 and float64 round-off pick
different ones), and Adam's coordinate-wise second moment in that basis makes
every later update depend on the pick. Sharing the pick makes the comparison
well posed; ``fn`` can check that the basis it hands in is a valid one.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def merge_shape(shape: tuple[int, ...], max_precond_dim: int) -> tuple[int, ...]:
    """``SOAP.merge_dims``' output shape (channels-first)."""
    out: list[int] = []
    current = 1
    for size in shape:
        product = current * size
        if product > max_precond_dim:
            if current > 1:
                out.append(current)
                current = size
            else:
                out.append(size)
                current = 1
        else:
            current = product
    if current > 1 or len(out) == 0:
        out.append(current)
    return tuple(out)


class OfficialSOAP:
    """``SOAP`` with one parameter group; ``params`` a dict of arrays.

    ``lr`` is a float or a function of the call index (0 for the first call),
    standing for a PyTorch scheduler stepped after every ``step()``.
    """

    def __init__(self, params: dict, lr: float | Callable[[int], float] = 3e-3,
                 betas=(0.95, 0.95), shampoo_beta: float = -1, eps: float = 1e-8,
                 weight_decay: float = 0.01, precondition_frequency: int = 10,
                 max_precond_dim: int = 10000, merge_dims: bool = False,
                 precondition_1d: bool = False, normalize_grads: bool = False,
                 correct_bias: bool = True):
        self.params = {k: np.array(v, np.float64) for k, v in params.items()}
        self.lr = lr
        self.b1, self.b2 = betas
        self.shampoo_beta = shampoo_beta if shampoo_beta >= 0 else betas[1]
        self.eps = eps
        self.weight_decay = weight_decay
        self.frequency = precondition_frequency
        self.max_dim = max_precond_dim
        self.merge = merge_dims
        self.precondition_1d = precondition_1d
        self.normalize = normalize_grads
        self.correct_bias = correct_bias
        self.state: dict[str, dict] = {k: {} for k in params}
        self.calls = 0

    # -- shapes ----------------------------------------------------------------
    def _merged(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(merge_shape(x.shape, self.max_dim))

    def _work(self, x: np.ndarray) -> np.ndarray:
        return self._merged(x) if self.merge else x

    # -- projections (``project``/``project_back``) ----------------------------
    def _project(self, x: np.ndarray, st: dict, back: bool = False) -> np.ndarray:
        shape = x.shape
        y = self._work(x)
        # Contract the leading axis with Q each time (the new axis goes last),
        # or just rotate it to the end where the axis has no factor: after one
        # pass over the axes the order is the original one again.
        for q in st["Q"]:
            if q is None:
                y = np.moveaxis(y, 0, -1)
            else:
                y = np.tensordot(y, q, axes=([0], [1 if back else 0]))
        return y.reshape(shape)

    # -- factors --------------------------------------------------------------
    def _init_factors(self, g: np.ndarray, st: dict) -> None:
        if g.ndim == 1:
            keep = self.precondition_1d and g.shape[0] <= self.max_dim
            st["GG"] = [np.zeros((g.shape[0],) * 2) if keep else None]
        else:
            shape = self._work(g).shape
            st["GG"] = [np.zeros((n, n)) if n <= self.max_dim else None for n in shape]
        st["Q"] = None

    def _eigenbases(self, st: dict) -> list:
        out = []
        for m in st["GG"]:
            if m is None:
                out.append(None)
                continue
            q = np.linalg.eigh(m + 1e-30 * np.eye(m.shape[0]))[1]
            out.append(q[:, ::-1])  # torch.flip(Q, [1]): decreasing eigenvalues
        return out

    def _refresh(self, st: dict) -> list:
        """``get_orthogonal_matrix_QR``."""
        original = st["exp_avg_sq"].shape
        v = self._work(st["exp_avg_sq"])
        new = []
        for axis, (m, o) in enumerate(zip(st["GG"], st["Q"])):
            if m is None:
                new.append(None)
                continue
            estimate = np.diag(o.T @ m @ o)
            order = np.argsort(-estimate, kind="stable")
            v = np.take(v, order, axis=axis)
            new.append(np.linalg.qr(m @ o[:, order])[0])
        st["exp_avg_sq"] = v.reshape(original)
        return new

    def _update_factors(self, g: np.ndarray, st: dict, first_bases=None) -> None:
        """``update_preconditioner``; ``first_bases(GG)`` stands in for ``eigh``."""
        if st["Q"] is not None:
            st["exp_avg"] = self._project(st["exp_avg"], st, back=True)
        weight = 1 - self.shampoo_beta
        if g.ndim == 1:
            if st["GG"][0] is not None:
                m = st["GG"][0]
                st["GG"][0] = m + weight * (np.outer(g, g) - m)  # lerp_
        else:
            w = self._work(g)
            for axis, m in enumerate(st["GG"]):
                if m is not None:
                    others = [k for k in range(w.ndim) if k != axis]
                    outer = np.tensordot(w, w, axes=(others, others))
                    st["GG"][axis] = m + weight * (outer - m)
        if st["Q"] is None:
            st["Q"] = self._eigenbases(st) if first_bases is None else list(first_bases(st["GG"]))
        if st["step"] > 0 and st["step"] % self.frequency == 0:
            st["Q"] = self._refresh(st)
        if st["step"] > 0:
            st["exp_avg"] = self._project(st["exp_avg"], st)

    # -- one call of ``SOAP.step`` ---------------------------------------------
    def step(self, grads: dict, first_bases: Callable | None = None) -> dict:
        lr = self.lr(self.calls) if callable(self.lr) else self.lr
        self.calls += 1
        for name, p in self.params.items():
            g = np.array(grads[name], np.float64)
            st = self.state[name]
            if "step" not in st:
                st["step"] = 0
            if "exp_avg" not in st:
                st["exp_avg"] = np.zeros_like(g)
                st["exp_avg_sq"] = np.zeros_like(g)
            if "Q" not in st:
                self._init_factors(g, st)
                self._update_factors(
                    g, st, None if first_bases is None else lambda gg: first_bases(name, gg))
                continue  # the first call only initialises

            g_rot = self._project(g, st)
            st["step"] += 1
            t = st["step"]
            st["exp_avg"] = self.b1 * st["exp_avg"] + (1 - self.b1) * g_rot
            st["exp_avg_sq"] = self.b2 * st["exp_avg_sq"] + (1 - self.b2) * g_rot**2
            denom = np.sqrt(st["exp_avg_sq"]) + self.eps
            step_size = lr
            if self.correct_bias:
                step_size *= np.sqrt(1 - self.b2**t) / (1 - self.b1**t)
            direction = self._project(st["exp_avg"] / denom, st, back=True)
            if self.normalize:
                direction = direction / (1e-30 + np.mean(direction**2) ** 0.5)
            p = p - step_size * direction
            if self.weight_decay > 0:
                p = p - lr * self.weight_decay * p  # on the stepped weights
            self.params[name] = p
            self._update_factors(g, st)
        return self.params
