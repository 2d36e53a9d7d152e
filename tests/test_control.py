"""Tests of gnopt.control: bounds, saturation, anti-windup, rejection, tracing."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import dataclasses

from gnopt.control import (AbstractController, NielsenState, PIController, PIState,
                           damping_controller, fusion_weight_controller, nielsen_damping)


@st.composite
def controllers(draw, zero_gains=False):
    """Valid controllers whose integral term alone can reach either limit."""
    log_space = draw(st.booleans())
    if log_space:
        low_log = draw(st.floats(-18.0, 0.0))
        high_log = low_log + draw(st.floats(1.0, 18.0))
        bias = low_log + draw(st.floats(0.05, 0.95)) * (high_log - low_log)
        low, high, output0 = math.exp(low_log), math.exp(high_log), math.exp(bias)
        span = max(high_log - bias, bias - low_log)
    else:
        low = round(draw(st.floats(-10.0, 10.0)), 3)  # no float32 subnormals (flushed to 0)
        high = low + round(draw(st.floats(0.1, 10.0)), 3)
        output0 = low + draw(st.floats(0.05, 0.95)) * (high - low)
        span = max(high - output0, output0 - low)
    kp = 0.0 if zero_gains else draw(st.floats(0.0, 2.0))
    ki = 0.0 if zero_gains else draw(st.floats(0.1, 2.0))
    integral_limit = draw(st.floats(1.1, 4.0)) * span / (ki or 1.0)
    return PIController(
        setpoint=draw(st.floats(-2.0, 2.0)), kp=kp, ki=ki, output0=output0,
        output_min=low, output_max=high, integral_limit=integral_limit,
        error_limit=draw(st.floats(1.0, 10.0)), direction=draw(st.sampled_from([1, -1])),
        reject_below=draw(st.none() | st.floats(-2.0, 2.0)), log_space=log_space)


measurements = st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=40)


def run(controller, values):
    """Outputs, integrals and accept flags over a sequence of measurements."""
    def body(state, m):
        state, accept = controller.update(state, m)
        return state, (state.output, state.integral, accept)
    _, out = jax.lax.scan(body, controller.init(), jnp.asarray(values, jnp.float32))
    return tuple(np.asarray(x) for x in out)


def limits(controller):
    return np.float32(controller.output_min), np.float32(controller.output_max)


@given(controllers(), measurements)
def test_output_and_integral_stay_in_bounds(controller, values):
    outputs, integrals, _ = run(controller, values)
    low, high = limits(controller)
    assert np.all(np.isfinite(outputs)) and np.all(np.isfinite(integrals))
    assert np.all((low <= outputs) & (outputs <= high)), (outputs, low, high)
    assert np.all(np.abs(integrals) <= np.float32(controller.integral_limit))


@given(controllers(), st.sampled_from([1.0, -1.0]), st.floats(0.05, 1.0), st.floats(0.05, 1.0))
def test_saturates_then_turns_within_anti_windup_bound(controller, sign, push, pull):
    """Constant error e drives u to the limit of e's sign; a reversed error leaves it in time."""
    controller = dataclasses.replace(controller, reject_below=None)  # rejections: tested below
    low, high = limits(controller)
    limit, away = (high, np.less) if sign > 0 else (low, np.greater)
    saturate = math.ceil(controller.integral_limit / push) + 1
    m_push = controller.setpoint + controller.direction * sign * push
    outputs, _, _ = run(controller, [m_push] * saturate)
    assert outputs[-1] == limit, (outputs, limit)
    bound = max(1, math.ceil(controller.integral_limit / pull))
    m_pull = controller.setpoint - controller.direction * sign * pull
    outputs, _, _ = run(controller, [m_push] * 3 * saturate + [m_pull] * bound)
    turned = away(outputs[3 * saturate:], limit)
    assert turned.any(), f"still at {limit} after {bound} reversed steps: {outputs}"


@given(controllers(zero_gains=True), measurements)
def test_zero_gains_hold_output0(controller, values):
    outputs, _, _ = run(controller, values)
    np.testing.assert_allclose(outputs, np.float32(controller.output0), rtol=1e-6)


@given(controllers(), measurements)
def test_accept_flag(controller, values):
    _, _, accept = run(controller, values)
    m = np.asarray(values, np.float32)
    expected = np.isfinite(m)
    if controller.reject_below is not None:
        expected &= m >= np.float32(controller.reject_below)
    np.testing.assert_array_equal(accept, expected)


@given(controllers(), measurements, st.lists(st.booleans(), min_size=40, max_size=40))
def test_a_rejected_step_counts_as_the_worst_error(controller, values, verdicts):
    """Rejected by the threshold or by the transform, the error is −d·E, so the
    knob always moves away from a rejected step (damping up, fusion weight down)."""
    def body(state, xs):
        m, verdict = xs
        new, accept = controller.update(state, m, verdict)
        return new, (accept, new.last_error)

    m = jnp.asarray(values, jnp.float32)
    _, (accept, errors) = jax.lax.scan(body, controller.init(), (m, jnp.asarray(verdicts[:len(values)])))
    accept, errors = np.asarray(accept), np.asarray(errors)
    expected = np.isfinite(np.asarray(m)) & np.asarray(verdicts[:len(values)], bool)
    if controller.reject_below is not None:
        expected &= np.asarray(m) >= np.float32(controller.reject_below)
    np.testing.assert_array_equal(accept, expected)
    worst = np.float32(-controller.direction * controller.error_limit)
    np.testing.assert_array_equal(errors[~accept], worst)


@given(st.lists(st.floats(-50.0, -0.25, width=32), min_size=1, max_size=12),
       st.sampled_from(["pi", "nielsen"]))
def test_damping_rises_after_every_rejection(rhos, kind):
    """Levenberg–Marquardt: each rejected step (here ρ < 0) raises δ until its limit."""
    controller = (damping_controller(damping0=1e-3, reject_below=0.0) if kind == "pi"
                  else nielsen_damping(1e-3))
    assert isinstance(controller, AbstractController) and controller.rejects
    state = controller.init()
    state, _ = controller.update(state, 0.9)  # one good step first
    for rho in rhos:
        new, accept = controller.update(state, rho)
        assert not accept
        limit = controller.output_max if kind == "pi" else controller.damping_max
        assert float(new.output) > float(state.output) or float(new.output) == np.float32(limit)
        state = new


def test_nielsen_rule_against_its_published_formula():
    """Madsen, Nielsen & Tingleff (2004), Algorithm 3.16: μ·max(1/3, 1 − (2ρ−1)³), ν = 2
    on a kept step; μ·ν, ν ← 2ν on a rejected one."""
    controller = nielsen_damping(1.0)
    state = controller.init()
    mu, nu = 1.0, 2.0
    for rho in [0.9, 0.2, -1.0, -1.0, jnp.nan, 0.6, 0.01, 1.5]:
        state, accept = controller.update(state, rho)
        if rho > 0:
            mu, nu = mu * max(1 / 3, 1 - (2 * rho - 1) ** 3), 2.0
        else:
            mu, nu = mu * nu, 2 * nu
        assert bool(accept) == (rho > 0)
        np.testing.assert_allclose(float(state.output), mu, rtol=1e-6)
        np.testing.assert_allclose(float(state.growth), nu, rtol=1e-6)
    assert isinstance(state, NielsenState)
    with pytest.raises(ValueError, match="damping0"):
        nielsen_damping(float("nan"))


def test_nonfinite_measurement_counts_as_worst_error():
    controller = fusion_weight_controller()
    state, accept = controller.update(controller.init(), jnp.nan)
    assert not accept
    assert float(state.last_error) == -controller.error_limit
    assert float(state.output) < controller.output0


def test_jit_traces_once_over_many_updates():
    controller = damping_controller()
    traces = []

    @jax.jit
    def step(state, m):
        traces.append(1)
        return controller.update(state, m)

    state = controller.init()
    for m in np.linspace(-3.0, 3.0, 50, dtype=np.float32):
        state, _ = step(state, m)
    state, _ = step(state, np.float32(np.inf))
    assert len(traces) == 1
    assert int(state.steps) == 51
    assert isinstance(state, PIState)


def test_damping_follows_levenberg_marquardt_direction():
    controller = damping_controller(kp=0.0)
    init = controller.init()
    good, accept = controller.update(init, 0.75)
    assert accept
    np.testing.assert_allclose(float(good.output), math.exp(-0.375), rtol=1e-6)
    bad, _ = controller.update(init, 0.25)
    np.testing.assert_allclose(float(bad.output), math.exp(0.375), rtol=1e-6)
    diverged, accept = controller.update(init, -jnp.inf)
    assert not accept and float(diverged.output) > float(bad.output)


def test_fusion_weight_defaults():
    controller = fusion_weight_controller(reject_below=0.0)
    assert (controller.output_min, controller.output_max, controller.setpoint) == (0.0, 1.0, 0.75)
    assert controller.ki * controller.integral_limit == pytest.approx(0.5)
    _, accept = controller.update(controller.init(), -0.1)
    assert not accept


@pytest.mark.parametrize("field, kwargs", [
    ("output0", dict(output0=2.0)),
    ("log_space", dict(log_space=True, output_min=0.0)),
    ("ki", dict(ki=-1.0)),
    ("error_limit", dict(error_limit=0.0)),
    ("direction", dict(direction=0)),
])
def test_invalid_config_names_the_field(field, kwargs):
    config = dict(setpoint=0.0, kp=1.0, ki=1.0, output0=0.5, output_min=0.0, output_max=1.0,
                  integral_limit=1.0, error_limit=1.0) | kwargs
    with pytest.raises(ValueError, match=field):
        PIController(**config)
