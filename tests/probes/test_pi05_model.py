"""The reference's building blocks against float64 formulas written from the spec."""
from __future__ import annotations

import math

import pytest
import torch

from parity.probes.pi05.config import FULL, TINY, get_config
from parity.probes.pi05.faults import Faults
from parity.probes.pi05.fp8 import Fp8Weight, fp8_linear
from parity.probes.pi05.inputs import make_noise, make_observation
from parity.probes.pi05.layers import AttnContext, MaskedCore, PackedCore, RMSNorm, apply_rope, rope_tables
from parity.probes.pi05.model import Pi05Policy, Variant, sincos_time_embedding

NONE = Faults()


def naive_attention(q, k, v, q_valid, k_valid, scale):
    """float64, per head, straight from the spec: masked logits -> softmax -> times v."""
    q, k, v = q.double(), k.double(), v.double()
    B, T, Hq, D = q.shape
    group = Hq // k.shape[2]
    out = torch.zeros(B, T, Hq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            logits = (q[b, :, h] * scale) @ k[b, :, h // group].T  # [T, S]
            allowed = q_valid[b][:, None] & k_valid[b][None, :]
            logits = logits.masked_fill(~allowed, -2.3819763e38)
            out[b, :, h] = logits.softmax(-1) @ v[b, :, h // group]
    return out.reshape(B, T, Hq * D)


def random_qkv(gen, B=2, T=7, S=7, Hq=4, Hkv=1, D=8):
    return (torch.randn(B, T, Hq, D, generator=gen), torch.randn(B, S, Hkv, D, generator=gen),
            torch.randn(B, S, Hkv, D, generator=gen))


def test_masked_core_matches_float64_reference_with_gqa_and_mask():
    gen = torch.Generator().manual_seed(1)
    q, k, v = random_qkv(gen)
    valid = torch.rand(2, 7, generator=gen) > 0.3
    valid[:, 0] = True
    ctx = AttnContext(q_valid=valid, k_valid=valid)
    got = MaskedCore(NONE)(q, k, v, ctx, 0.25)
    want = naive_attention(q, k, v, valid, valid, 0.25)
    rows = valid[..., None].expand_as(got)
    torch.testing.assert_close(got[rows].double(), want[rows], rtol=1e-5, atol=1e-5)


def test_packed_core_equals_masked_core_on_valid_tokens():
    gen = torch.Generator().manual_seed(2)
    q, k, v = random_qkv(gen, T=9, S=9)
    valid = torch.rand(2, 9, generator=gen) > 0.4
    valid[:, 0] = True
    ctx = AttnContext(q_valid=valid, k_valid=valid)
    packed = PackedCore(NONE)(q, k, v, ctx, 0.3)
    masked = MaskedCore(NONE)(q, k, v, ctx, 0.3)
    torch.testing.assert_close(packed[valid], masked[valid], rtol=1e-5, atol=1e-5)


def test_nomask_fault_attends_to_padding():
    gen = torch.Generator().manual_seed(3)
    q, k, v = random_qkv(gen)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[:, -2:] = False
    ctx = AttnContext(q_valid=valid, k_valid=valid)
    good = MaskedCore(NONE)(q, k, v, ctx, 0.25)
    bad = MaskedCore(Faults.parse(["nomask"]))(q, k, v, ctx, 0.25)
    assert not torch.allclose(good[valid], bad[valid], atol=1e-3)


def rope_float64(x, positions, theta):
    x = x.double()
    D = x.shape[-1]
    out = torch.empty_like(x)
    for i in range(D // 2):
        freq = theta ** (-2.0 * i / D)
        ang = positions.double()[..., None] * freq  # [B, T, 1]
        a, b = x[..., i], x[..., i + D // 2]
        out[..., i] = a * ang.cos() - b * ang.sin()
        out[..., i + D // 2] = b * ang.cos() + a * ang.sin()
    return out


def test_rope_is_half_split_theta_10000():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 6, 2, 16, generator=gen)
    pos = torch.tensor([[0, 1, 2, 5, 100, 511]])
    tables = rope_tables(pos, 16, 10000.0)
    got = apply_rope(x, tables, interleaved=False)
    torch.testing.assert_close(got.double(), rope_float64(x, pos, 10000.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[:, 0], x[:, 0])  # position 0 is the identity
    assert not torch.allclose(apply_rope(x, tables, interleaved=True), got, atol=1e-3)


def test_rmsnorm_scales_by_one_plus_w_with_fp32_statistics():
    gen = torch.Generator().manual_seed(5)
    norm = RMSNorm(16, 1e-6, NONE)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=gen) * 0.3)
    x = torch.randn(3, 16, generator=gen).to(torch.bfloat16)
    got, gate = norm(x)
    xd = x.double()
    want = xd / torch.sqrt((xd ** 2).mean(-1, keepdim=True) + 1e-6) * (1 + norm.weight.double())
    assert gate is None and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2)  # one bf16 rounding
    plain, _ = RMSNorm(16, 1e-6, Faults.parse(["norm_plain_w"])).requires_grad_(False)(x)
    assert not torch.allclose(plain.float(), got.float())


def test_time_embedding_sin_first_log_spaced_periods():
    t = torch.tensor([0.3, 1.0])
    emb = sincos_time_embedding(t, 8)
    periods = [4e-3 * (4.0 / 4e-3) ** (k / 3) for k in range(4)]
    want = [[math.sin(2 * math.pi * ti / p) for p in periods] + [math.cos(2 * math.pi * ti / p) for p in periods]
            for ti in t.tolist()]
    torch.testing.assert_close(emb.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-4, atol=1e-4)


def test_fp8_emulation_dequantises_exactly():
    gen = torch.Generator().manual_seed(6)
    w = Fp8Weight.quantize(torch.randn(32, 16, generator=gen))
    x = torch.randn(5, 16, generator=gen)
    y = fp8_linear(x, w, torch.float32)
    scale = x.abs().amax() / 448
    x8 = (x / scale).to(torch.float8_e4m3fn).double() * scale.double()
    want = x8 @ w.dequantize().double().T
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    rel = (y - x @ w.dequantize().T).norm() / (x @ w.dequantize().T).norm()
    assert 1e-4 < rel < 0.1  # quantising the activation is lossy, but not wildly


def test_reference_is_deterministic_and_uses_same_noise():
    cfg = TINY
    model = Pi05Policy.build(cfg, 0, Variant(), NONE, torch.bfloat16, torch.device("cpu"))
    obs, noise = make_observation(cfg, 0), make_noise(cfg, 0)
    a1, a2 = model.sample_actions(obs, noise), model.sample_actions(obs, noise)
    assert torch.equal(a1, a2)
    assert torch.equal(noise, make_noise(cfg, 0)) and not torch.equal(noise, make_noise(cfg, 1))


def test_observation_has_masked_camera_and_padding():
    obs = make_observation(TINY, 0)
    assert obs.image_masks.tolist() == [[True, True, False]]
    assert obs.images[0, 2].abs().sum() == 0
    n = int(obs.token_mask.sum())
    assert 2 <= n < TINY.max_token_len and obs.tokens[0, 0] == 2 and (obs.tokens[0, n:] == 0).all()


def test_full_config_is_the_real_pi05():
    assert (FULL.llm.width, FULL.llm.depth, FULL.llm.mlp_dim, FULL.llm.num_heads, FULL.llm.num_kv_heads,
            FULL.llm.head_dim) == (2048, 18, 16384, 8, 1, 256)
    assert (FULL.expert.width, FULL.expert.mlp_dim) == (1024, 4096)
    assert (FULL.vision.width, FULL.vision.depth, FULL.vision.num_tokens) == (1152, 27, 256)
    assert FULL.prefix_len == 968
    with pytest.raises(ValueError, match="unknown pi0.5 config"):
        get_config("huge")
