"""A PI controller for any scalar optimizer knob (algorithms.md §3 step 6).

The controller measures a signal ``m_t`` (typically the trust ratio
``ρ_t = (L(θ) − L(θ+Δ)) / (q(0) − q(Δ))``) and sets a knob ``u_{t+1}`` in
positional PI form with anti-windup:

    e_t = d · clip(m_t − m*, −E, E)                 (d = ±1: direction)
    I_t = clip(I_{t−1} + e_t, −I_max, I_max)        (anti-windup clamp)
    u_{t+1} = clip(u_0 + K_p e_t + K_i I_t, u_min, u_max)

or, with ``log_space=True`` (for knobs spanning decades, like damping δ),
``u_{t+1} = clip(exp(log u_0 + K_p e_t + K_i I_t), u_min, u_max)``.

A non-finite measurement reads as the worst admissible one, ``m* − E`` (a bad
step), and is always rejected; so does a *rejected* measurement (below
``reject_below``, or rejected by the transform, e.g. a line search that found
no decrease): the knob always moves away from a rejected step (damping rises,
a fusion weight falls). The state never becomes non-finite.

Every controller here is an :class:`AbstractController`: ``init() -> state``
(with the knob in ``state.output``) and ``update(state, measurement, accept)
-> (state, accept)``, the second ``accept`` the controller's decision on the
measured step, which every gnopt transform honours (the step is not applied).

Numbers are data: every gain, setpoint, limit and threshold is an ordinary
field (a pytree leaf, a Python float or an array), so a controller passed to a
jitted function can be given new gains (``eqx.tree_at``) without a retrace,
and a sweep over gains can be ``jax.vmap``-ped. Only structure is static: the
``direction`` sign, ``log_space``, and whether ``reject_below`` is set at all.
Construction checks apply to concrete values; traced ones are not checked.

Anti-windup bound: once saturated at a limit after any history, an error of
constant magnitude ``|e| > 0`` of the opposite sign brings the integral to the
other side of zero within ``⌈I_max / |e|⌉`` steps, so the knob leaves a limit it
reached through the integral term within ``max(1, ⌈I_max / |e|⌉)`` steps
whenever ``u_0`` lies strictly inside ``(u_min, u_max)``.
"""

from __future__ import annotations

import abc
import math
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from gnopt._checks import check_number, is_traced

Array = jax.Array


class PIState(NamedTuple):
    """State of a :class:`PIController` (all scalar arrays)."""

    integral: Array  # I_t, the clamped sum of signed errors (float32)
    output: Array  # u_{t+1}, the knob to use for the next step (float32)
    steps: Array  # number of updates so far (int32)
    last_error: Array  # e_t of the last update, after sign and clipping (float32)


class AbstractController(eqx.Module):
    """A controller of one scalar knob (damping, fusion weight) driven by a
    measurement of each step (typically the trust ratio ``ρ``).

    Concrete controllers are final classes; gnopt's transforms take any of them.
    """

    @abc.abstractmethod
    def init(self) -> Any:
        """The state before any measurement; ``state.output`` is the first knob."""

    @abc.abstractmethod
    def update(self, state, measurement, accept=True) -> tuple[Any, Array]:
        """One controller step.

        Args:
          state: the previous state.
          measurement: the scalar measured on the step just taken (may be non-finite).
          accept: the transform's own verdict on the step (e.g. ``False`` after a
            line search found no decrease); a rejected step counts as a bad one.

        Returns:
          ``(new_state, accept)``: ``new_state.output`` is the knob for the next
          step; ``accept`` (bool scalar) whether to keep the measured step.
        """

    @property
    @abc.abstractmethod
    def rejects(self) -> bool:
        """Whether the controller rejects steps on its own (not only non-finite ones)."""


def decide(controllers, states, measurement, accept=True) -> tuple[tuple, Array]:
    """Every controller's step on one measurement; the step is kept only if all accept.

    Each controller sees the verdict so far (a rejection by an earlier one, or
    by the transform, counts as a bad step for the later ones too). Returns
    ``(new_states, accept)``, the states in the order of ``controllers``.
    """
    accept = jnp.asarray(accept, bool)
    new_states = []
    for controller, state in zip(controllers, states, strict=True):
        state, verdict = controller.update(state, measurement, accept)
        new_states.append(state)
        accept = accept & jnp.asarray(verdict, bool)
    return tuple(new_states), accept


def _scalar_measurement(name: str, measurement) -> Array:
    m = jnp.asarray(measurement)
    if m.shape != ():
        raise ValueError(f"{name}.update: measurement must be a scalar, got shape {m.shape}")
    return m.astype(jnp.promote_types(m.dtype, jnp.float32))


class PIController(AbstractController):
    """Proportional–integral controller with anti-windup and step rejection.

    Attributes:
      setpoint: target value ``m*`` of the measured signal.
      kp: proportional gain ``K_p ≥ 0``.
      ki: integral gain ``K_i ≥ 0``.
      output0: bias ``u_0``, the output at zero error and zero integral.
      output_min: lower limit ``u_min`` (``> 0`` in log space).
      output_max: upper limit ``u_max``.
      integral_limit: anti-windup clamp ``I_max ≥ 0``.
      error_limit: ``E > 0``; errors are clipped to ``[−E, E]`` and a non-finite
        measurement counts as ``m* − E``.
      direction: ``+1``: a measurement above the setpoint raises the output;
        ``−1``: it lowers the output (damping: a high trust ratio lowers δ).
      reject_below: if set, ``accept`` is false when the measurement is below it.
      log_space: act on ``log u`` (knobs spanning decades).
    """

    setpoint: float
    kp: float
    ki: float
    output0: float
    output_min: float
    output_max: float
    integral_limit: float
    error_limit: float
    direction: int = eqx.field(static=True, default=1)
    reject_below: float | None = None  # None (never reject) is structure, a value is data
    log_space: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        for name in ("setpoint", "output0", "output_min", "output_max"):
            check_number("PIController", name, getattr(self, name))
        if self.reject_below is not None:
            check_number("PIController", "reject_below", self.reject_below)
        for name in ("kp", "ki", "integral_limit"):
            check_number("PIController", name, getattr(self, name), low=0.0)
        check_number("PIController", "error_limit", self.error_limit, low=0.0, low_open=True)
        if self.direction not in (1, -1):
            raise ValueError(f"PIController: direction must be +1 or -1, got {self.direction}")
        if is_traced(self.output0, self.output_min, self.output_max):
            return  # traced limits (vmap, inject_hyperparams): not comparable here
        if not self.output_min <= self.output0 <= self.output_max:
            raise ValueError(
                f"PIController: output0={self.output0} must lie in "
                f"[output_min={self.output_min}, output_max={self.output_max}]")
        if self.log_space and not self.output_min > 0:
            raise ValueError(
                f"PIController: log_space needs output_min > 0, got {self.output_min}")

    def init(self) -> PIState:
        """The state before any measurement: zero integral, output ``u_0``."""
        return PIState(
            integral=jnp.zeros((), jnp.float32),
            output=jnp.asarray(self.output0, jnp.float32),
            steps=jnp.zeros((), jnp.int32),
            last_error=jnp.zeros((), jnp.float32),
        )

    @property
    def rejects(self) -> bool:
        return self.reject_below is not None

    def update(self, state: PIState, measurement, accept=True) -> tuple[PIState, Array]:
        """One controller step.

        Args:
          state: the previous :class:`PIState`.
          measurement: scalar measured signal ``m_t`` (may be non-finite).
          accept: the transform's verdict on the step; ``False`` counts as a bad step.

        Returns:
          ``(new_state, accept)``; ``new_state.output`` is the knob for the next
          step and ``accept`` (bool scalar) says whether the measured step should
          be kept: ``m_t`` finite, ``accept`` given true and, if ``reject_below``
          is set, ``m_t ≥ reject_below``. A rejected step's error is the worst
          admissible one, ``−d·E``.
        """
        m = _scalar_measurement("PIController", measurement)
        finite = jnp.isfinite(m)
        keep = finite & jnp.asarray(accept, bool)
        if self.reject_below is not None:
            keep = keep & (m >= self.reject_below)
        limit = self.error_limit
        raw = jnp.where(keep, jnp.clip(m - self.setpoint, -limit, limit), -limit)
        error = (self.direction * raw).astype(jnp.float32)
        integral = jnp.clip(state.integral + error, -self.integral_limit, self.integral_limit)
        bias = jnp.log(self.output0) if self.log_space else self.output0
        drive = bias + self.kp * error + self.ki * integral
        output = jnp.exp(drive) if self.log_space else drive
        output = jnp.clip(output, self.output_min, self.output_max)
        new_state = PIState(integral, output.astype(jnp.float32), state.steps + 1, error)
        return new_state, keep


def _integral_span(ki: float, output0: float, low: float, high: float) -> float:
    """Smallest ``I_max`` with which the integral term alone reaches either limit
    (a Python float for concrete arguments, an array for traced ones)."""
    if is_traced(ki, output0, low, high):
        positive = ki > 0
        span = jnp.maximum(high - output0, output0 - low)
        return jnp.where(positive, span / jnp.where(positive, ki, 1.0), 0.0)
    return max(high - output0, output0 - low) / ki if ki > 0 else 0.0


def fusion_weight_controller(
    *,
    setpoint: float = 0.75,
    kp: float = 0.5,
    ki: float = 0.1,
    lambda0: float = 0.5,
    lambda_max: float = 1.0,
    integral_limit: float | None = None,
    reject_below: float | None = None,
) -> PIController:
    """PI-Muon's fusion weight ``λ_t ∈ [0, λ_max]`` driven by the trust ratio ρ_t.

    A trust ratio above ``ρ*`` (the quadratic model predicts the loss well) adds
    more of the curvature direction ``s⊥``; below it, less (algorithms.md §3).

    Args:
      setpoint: ``ρ*``.
      kp: proportional gain.
      ki: integral gain.
      lambda0: bias ``λ_0``.
      lambda_max: upper limit of ``λ``.
      integral_limit: anti-windup clamp; default: the smallest value with which
        the integral term alone can reach either limit, ``max(λ_max − λ_0, λ_0) / K_i``.
      reject_below: reject steps with ``ρ_t`` below this (e.g. ``0.0``).
    """
    if integral_limit is None:
        integral_limit = _integral_span(ki, lambda0, 0.0, lambda_max)
    return PIController(
        setpoint=setpoint, kp=kp, ki=ki, output0=lambda0, output_min=0.0,
        output_max=lambda_max, integral_limit=integral_limit, error_limit=1.0,
        direction=1, reject_below=reject_below)


def damping_controller(
    *,
    setpoint: float = 0.5,
    kp: float = 0.5,
    ki: float = 1.5,
    damping0: float = 1.0,
    damping_min: float = 1e-8,
    damping_max: float = 1e4,
    integral_limit: float | None = None,
    reject_below: float | None = None,
) -> PIController:
    """A smooth Levenberg–Marquardt rule for the damping ``δ`` of ``(G + δI) s = −g``.

    The classic rule (Levenberg 1944; Marquardt 1963; Martens 2010 §4.1) is
    ``δ ← 2/3 δ`` if ``ρ > 3/4`` and ``δ ← 3/2 δ`` if ``ρ < 1/4``: an integral
    controller on ``log δ`` with a bang-bang error. Here the error is smooth,
    ``e = −(ρ − ρ*)`` with ``ρ* = 1/2`` midway between the classic thresholds,
    and ``K_i = 1.5`` makes ``ρ = 3/4`` (``1/4``) scale δ by ``exp(∓0.375) ≈
    0.69 (1.45)`` per step, close to the classic ``2/3`` (``3/2``). ``kp=0``
    gives the pure integral rule.

    Args:
      setpoint: ``ρ*``.
      kp: proportional gain on ``log δ``.
      ki: integral gain on ``log δ``.
      damping0: bias ``δ_0``.
      damping_min: lower limit of ``δ`` (``> 0``).
      damping_max: upper limit of ``δ``.
      integral_limit: anti-windup clamp; default: the smallest value with which
        the integral term alone spans ``[log δ_min, log δ_max]`` from ``log δ_0``.
      reject_below: reject steps with ``ρ_t`` below this (e.g. ``0.0``).
    """
    if integral_limit is None and is_traced(damping0, damping_min, damping_max):
        integral_limit = _integral_span(
            ki, jnp.log(damping0), jnp.log(damping_min), jnp.log(damping_max))
    elif integral_limit is None and damping_min > 0 and damping0 > 0:
        integral_limit = _integral_span(
            ki, math.log(damping0), math.log(damping_min), math.log(damping_max))
    return PIController(
        setpoint=setpoint, kp=kp, ki=ki, output0=damping0, output_min=damping_min,
        output_max=damping_max, integral_limit=integral_limit, error_limit=1.0,
        direction=-1, reject_below=reject_below, log_space=True)



class NielsenState(NamedTuple):
    """State of :class:`NielsenDamping` (all scalar arrays)."""

    output: Array  # δ for the next step (float32)
    growth: Array  # ν, the factor of the next rise (float32)
    steps: Array  # number of updates so far (int32)


class NielsenDamping(AbstractController):
    """Levenberg–Marquardt damping by Nielsen's rule (Nielsen 1999; Madsen,
    Nielsen & Tingleff 2004, *Methods for non-linear least squares problems*,
    eq. 3.16 and Algorithm 3.16).

    A step is kept iff its gain ratio ``ρ > reject_below`` (0: the loss fell);
    then ``δ ← δ · max(1/3, 1 − (2ρ − 1)³)`` and ``ν ← 2``; a rejected step
    leaves the parameters unchanged and sets ``δ ← ν δ``, ``ν ← 2ν``, so
    repeated rejections raise ``δ`` geometrically faster. ``δ`` stays in
    ``[damping_min, damping_max]``.

    Attributes:
      damping0: initial ``δ``.
      damping_min, damping_max: limits of ``δ``.
      reject_below: keep a step only if ``ρ`` exceeds this.
    """

    damping0: float = 1e-3
    damping_min: float = 1e-12
    damping_max: float = 1e12
    reject_below: float = 0.0

    def __check_init__(self):
        for name in ("damping0", "damping_min", "damping_max", "reject_below"):
            check_number("nielsen_damping", name, getattr(self, name))
        if is_traced(self.damping0, self.damping_min, self.damping_max):
            return  # traced limits (vmap, inject_hyperparams): not comparable here
        if not 0 < self.damping_min <= self.damping0 <= self.damping_max:
            raise ValueError(
                "nielsen_damping: need 0 < damping_min <= damping0 <= damping_max, got "
                f"{self.damping_min}, {self.damping0}, {self.damping_max}")

    @property
    def rejects(self) -> bool:
        return True

    def init(self) -> NielsenState:
        return NielsenState(jnp.asarray(self.damping0, jnp.float32), jnp.asarray(2.0, jnp.float32),
                            jnp.zeros((), jnp.int32))

    def update(self, state: NielsenState, measurement, accept=True) -> tuple[NielsenState, Array]:
        rho = _scalar_measurement("NielsenDamping", measurement)
        keep = jnp.isfinite(rho) & (rho > self.reject_below) & jnp.asarray(accept, bool)
        shrink = jnp.maximum(1.0 / 3.0, 1.0 - (2.0 * jnp.where(keep, rho, 0.0) - 1.0) ** 3)
        damping = jnp.where(keep, state.output * shrink, state.output * state.growth)
        damping = jnp.clip(damping, self.damping_min, self.damping_max).astype(jnp.float32)
        growth = jnp.where(keep, 2.0, jnp.minimum(2.0 * state.growth, 2.0 ** 20)).astype(jnp.float32)
        return NielsenState(damping, growth, state.steps + 1), keep


def nielsen_damping(damping0: float = 1e-3, *, damping_min: float = 1e-12,
                    damping_max: float = 1e12, reject_below: float = 0.0) -> NielsenDamping:
    """Levenberg–Marquardt damping with Nielsen's update (see :class:`NielsenDamping`)."""
    return NielsenDamping(damping0, damping_min, damping_max, reject_below)
