"""Our flow-matching loop and time embedding against float64 reimplementations of the
spec's formulas (PI05_SPEC section 4), written here from the text, not from our code.

  noise ~ N(0, 1), t = 1 (noise), dt = -1/num_steps; while t >= -dt/2:
  x <- x + dt * v(x, t); t <- t + dt (openpi accumulates t in float32: 0.79999995 ...).
  time embedding: [sin(2 pi t / p_k), cos(2 pi t / p_k)], sin first, k = 0 .. D/2 - 1,
  p_k = 4e-3 * (4 / 4e-3) ** (k / (D/2 - 1)).
Agreement: cos >= 0.99999 and relative L2 <= 1e-5 (float32 against float64)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from parity.comparison.metrics import compare
from parity.probes.pi05.config import FULL, TINY
from parity.probes.pi05.faults import Faults
from parity.probes.pi05.inputs import make_noise, make_observation
from parity.probes.pi05.layers import rope_tables
from parity.probes.pi05.model import Pi05Policy, Variant, sincos_time_embedding

MIN_COS, MAX_REL = 0.99999, 1e-5


def assert_agree(ours: torch.Tensor, want64: np.ndarray) -> None:
    m = compare(want64, ours.detach().double().numpy())
    assert m.cos >= MIN_COS and m.rel_l2 <= MAX_REL, f"cos {m.cos:.10f}, rel L2 {m.rel_l2:.3g}"


def time_embedding64(t: list[float], dim: int) -> np.ndarray:
    half = dim // 2
    out = np.empty((len(t), dim))
    for b, tb in enumerate(t):
        for k in range(half):
            period = 4e-3 * (4.0 / 4e-3) ** (k / (half - 1))
            out[b, k] = math.sin(2 * math.pi * tb / period)
            out[b, half + k] = math.cos(2 * math.pi * tb / period)
    return out


def euler64(v, x0: np.ndarray, num_steps: int) -> tuple[np.ndarray, list[float]]:
    """The spec's loop in float64 (t exact), returning the final x and the times used."""
    x, t, dt, times = x0.astype(np.float64), 1.0, -1.0 / num_steps, []
    while t >= -dt / 2:
        times.append(t)
        x = x + dt * v(x, t)
        t = t + dt
    return x, times


def fp32_times(num_steps: int) -> list[float]:
    t, dt, out = np.float32(1.0), np.float32(-1.0 / num_steps), []
    while t >= -dt / 2:
        out.append(float(t))
        t = np.float32(t + dt)
    return out


@pytest.mark.parametrize("dim", [TINY.expert.width, FULL.expert.width])
def test_time_embedding_at_the_loop_times_and_random_times(dim):
    times = fp32_times(10) + list(np.random.default_rng(0).random(6))
    got = sincos_time_embedding(torch.tensor(times, dtype=torch.float32), dim)
    assert got.dtype == torch.float32 and got.shape == (len(times), dim)
    # The embedding of the float32 time the model is given (t itself is not re-rounded).
    want = time_embedding64([float(np.float32(t)) for t in times], dim)
    assert_agree(got, want)


class Recorder:
    """Stands in for the network: a known velocity field, recording the times it is asked at."""

    def __init__(self, field):
        self.field, self.times = field, []

    def __call__(self, cache, rope, x_t, t, cond=None, modulations=None):
        assert x_t.dtype == torch.float32 and t.dtype == torch.float32  # state and t stay float32
        self.times.append(float(t[0]))
        return self.field(x_t.double(), t.double()[:, None, None]).float()


def tiny_model(dtype=torch.float32):
    return Pi05Policy.build(TINY, 0, Variant(), Faults(), dtype, torch.device("cpu"))


def test_loop_on_a_straight_path_lands_on_the_target_from_the_noise():
    """Straight path x_t = t * noise + (1 - t) * A has velocity (x - A) / t, and Euler is
    exact on it: from t = 1 (the noise) ten steps of dt = -0.1 end at A."""
    model = tiny_model()
    obs, noise = make_observation(TINY, 0), make_noise(TINY, 0)
    target = torch.randn(noise.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rec = Recorder(lambda x, t: (x - target) / t)
    model.velocity = rec
    got = model.sample_actions(obs, noise)
    want, times64 = euler64(lambda x, t: (x - target.numpy()) / t, noise.double().numpy(), TINY.num_steps)
    assert np.allclose(want, target.numpy(), atol=1e-12)  # the float64 loop is exact
    assert_agree(got, want)
    assert rec.times == fp32_times(TINY.num_steps)  # openpi: t accumulated in float32
    assert rec.times[2] == pytest.approx(0.79999995, abs=1e-8) and len(rec.times) == TINY.num_steps
    assert np.allclose(rec.times, times64, atol=1e-6)


def test_loop_with_the_network_against_float64_integration():
    """Our sample_actions (float32 state and t) against the spec's loop integrated in
    float64, both calling our float32 network for v."""
    model = tiny_model()
    obs, noise = make_observation(TINY, 0), make_noise(TINY, 0)
    cache = model.run_prefix(obs, model.plan_tokens(obs))
    num_valid = model.prefix_valid(obs).sum(1)
    positions = num_valid[:, None] + torch.arange(TINY.action_horizon)[None, :]
    rope = rope_tables(positions, TINY.expert.head_dim, TINY.rope_theta)

    def v(x, t):
        with torch.inference_mode():
            tt = torch.full((x.shape[0],), t, dtype=torch.float32)
            return model.velocity(cache, rope, torch.from_numpy(x).float(), tt).double().numpy()

    want, _ = euler64(v, noise.double().numpy(), TINY.num_steps)
    got = model.sample_actions(obs, noise)
    assert_agree(got, want)
