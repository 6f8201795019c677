"""Fidelity of the reference against code nobody here wrote: Hugging Face transformers.

Our Gemma decoder layer (plain RMSNorm path), RMSNorm, RoPE and GeGLU against
transformers' Gemma; our SigLIP encoder layer and whole vision tower against
transformers' SiglipVisionModel.  Same weights copied in (through our own checkpoint key
tables, so the openpi layout's names are checked against the real modules too), CPU,
float32, tiny sizes.  Agreement: cos >= 0.99999 and relative L2 <= 1e-5.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[test]')")

from transformers import GemmaConfig as HFGemmaConfig  # noqa: E402
from transformers import SiglipVisionConfig, SiglipVisionModel  # noqa: E402
from transformers.models.gemma import modeling_gemma as hf_gemma  # noqa: E402
from transformers.models.siglip import modeling_siglip as hf_siglip  # noqa: E402

from parity.comparison.metrics import compare  # noqa: E402
from parity.probes.pi05.ckpt_layout import map_keys  # noqa: E402
from parity.probes.pi05.config import GemmaConfig, VisionConfig  # noqa: E402
from parity.probes.pi05.faults import Faults  # noqa: E402
from parity.probes.pi05.layers import AttnContext, GatedMLP, MaskedCore, RMSNorm, apply_rope, rope_tables  # noqa: E402
from parity.probes.pi05.model import GemmaLayer, SiglipLayer, SiglipTower  # noqa: E402

MIN_COS, MAX_REL = 0.99999, 1e-5
NONE = Faults()
GEMMA = GemmaConfig(width=64, depth=1, mlp_dim=128, num_heads=4, num_kv_heads=1, head_dim=16)  # GQA 4:1
VISION = VisionConfig(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=14, image_size=56)
OPENPI_L = "paligemma_with_expert.paligemma.model.language_model.layers.0."
OPENPI_V = "paligemma_with_expert.paligemma.model.vision_tower.vision_model."


def assert_agree(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    m = compare(theirs.detach().double().numpy(), ours.detach().double().numpy())
    assert m.cos >= MIN_COS and m.rel_l2 <= MAX_REL, f"cos {m.cos:.8f}, rel L2 {m.rel_l2:.3g}"


def hf_gemma_config() -> HFGemmaConfig:
    cfg = HFGemmaConfig(hidden_size=GEMMA.width, intermediate_size=GEMMA.mlp_dim, num_attention_heads=GEMMA.num_heads,
                        num_key_value_heads=GEMMA.num_kv_heads, head_dim=GEMMA.head_dim, rms_norm_eps=1e-6,
                        hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh", rope_theta=10000.0,
                        attention_bias=False, num_hidden_layers=1, vocab_size=32)
    cfg._attn_implementation = "eager"
    return cfg


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (norm weights too: their default zeros would hide a missing + 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if p.ndim == 1 else p.shape[-1] ** -0.5))
    return module.float().eval()


def copy_through_layout(theirs: torch.nn.Module, ours: torch.nn.Module, openpi_prefix: str, our_prefix: str) -> None:
    """Load `theirs`' weights into `ours` by way of the openpi key table: HF name ->
    openpi checkpoint key -> our parameter name.  Every parameter on both sides is used."""
    state = {openpi_prefix + k.removeprefix("vision_model."): v for k, v in theirs.state_dict().items()}
    keymap = map_keys(list(state))
    assert not keymap.problems, keymap.problems
    ours_params = dict(ours.named_parameters())
    mapped = {name.removeprefix(our_prefix): key for name, key in keymap.sources.items()}
    assert set(mapped) == set(ours_params), set(mapped) ^ set(ours_params)
    with torch.no_grad():
        for name, key in mapped.items():
            ours_params[name].copy_(state[key].reshape(ours_params[name].shape))


def padded_batch(gen, B=2, T=9, width=GEMMA.width):
    x = torch.randn(B, T, width, generator=gen)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, 6:] = False  # right padding
    valid[1, 2:4] = False  # a masked block in the middle, like pi0.5's missing camera
    positions = (valid.cumsum(1) - 1).clamp(min=0)  # spec: cumsum(pad) - 1
    return x, valid, positions


def additive_mask(valid: torch.Tensor) -> torch.Tensor:
    """Bidirectional padding mask, as openpi hands it to the HF layers: [B, 1, T, T]."""
    allowed = valid[:, None, :, None] & valid[:, None, None, :]
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)


# ---- Gemma -------------------------------------------------------------------------
def test_gemma_decoder_layer_with_padding_mask_and_gqa():
    gen = torch.Generator().manual_seed(0)
    hf_cfg = hf_gemma_config()
    theirs = randomize(hf_gemma.GemmaDecoderLayer(hf_cfg, layer_idx=0), 1)
    ours = GemmaLayer(GEMMA, None, MaskedCore(NONE), 1e-6, NONE).float().eval()
    copy_through_layout(theirs, ours, OPENPI_L, "prefix.layers.0.")
    x, valid, positions = padded_batch(gen)
    rope = hf_gemma.GemmaRotaryEmbedding(hf_cfg)
    with torch.no_grad():
        want = theirs(x, attention_mask=additive_mask(valid), position_ids=positions,
                      position_embeddings=rope(x, positions))
        want = want[0] if isinstance(want, tuple) else want
        got, _, _ = ours(x, AttnContext(q_valid=valid, k_valid=valid), rope_tables(positions, GEMMA.head_dim, 10000.0))
    assert_agree(got[valid], want[valid])  # padded rows are don't-care on both sides


def test_rmsnorm_matches_gemma_rmsnorm():
    gen = torch.Generator().manual_seed(2)
    theirs = randomize(hf_gemma.GemmaRMSNorm(64, eps=1e-6), 3)
    ours = RMSNorm(64, 1e-6, NONE)
    with torch.no_grad():
        ours.weight.copy_(theirs.weight)
    x = torch.randn(3, 5, 64, generator=gen) * 3
    assert_agree(ours(x)[0], theirs(x))
    xb = x.to(torch.bfloat16)  # both: fp32 statistics and (1 + w), one rounding to bf16
    assert torch.equal(ours(xb)[0], theirs(xb))


def test_rope_matches_gemma_rotary_embedding():
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 7, 4, 16, generator=gen)  # [B, T, H, D]
    k = torch.randn(2, 7, 1, 16, generator=gen)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 1, 1, 1, 2, 300, 511]])
    cos, sin = hf_gemma.GemmaRotaryEmbedding(hf_gemma_config())(q, positions)
    want_q, want_k = hf_gemma.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    assert_agree(apply_rope(q, rope_tables(positions, q.shape[-1], 10000.0), interleaved=False), want_q.transpose(1, 2))
    assert_agree(apply_rope(k, rope_tables(positions, k.shape[-1], 10000.0), interleaved=False), want_k.transpose(1, 2))


def test_geglu_matches_gemma_mlp():
    gen = torch.Generator().manual_seed(5)
    theirs = randomize(hf_gemma.GemmaMLP(hf_gemma_config()), 6)
    ours = GatedMLP(GEMMA.width, GEMMA.mlp_dim, NONE).float()
    ours.load_state_dict(theirs.state_dict())  # gate_proj / up_proj / down_proj, as named in the openpi layout
    x = torch.randn(4, 3, GEMMA.width, generator=gen)
    with torch.no_grad():
        assert_agree(ours(x), theirs(x))


# ---- SigLIP ------------------------------------------------------------------------
def hf_siglip_config() -> SiglipVisionConfig:
    cfg = SiglipVisionConfig(hidden_size=VISION.width, intermediate_size=VISION.mlp_dim,
                             num_hidden_layers=VISION.depth, num_attention_heads=VISION.num_heads,
                             image_size=VISION.image_size, patch_size=VISION.patch_size, num_channels=3,
                             layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", vision_use_head=False)
    cfg._attn_implementation = "eager"
    return cfg


def siglip_pair(seed: int):
    theirs = SiglipVisionModel(hf_siglip_config()).float().eval()
    randomize(theirs, seed)
    with torch.no_grad():  # LayerNorm scales around 1, as trained ones are
        for name, p in theirs.named_parameters():
            if "layer_norm" in name or "layernorm" in name:
                p.add_(1.0 if name.endswith("weight") else 0.0)
    ours = SiglipTower(VISION, MaskedCore(NONE), NONE).float().eval()
    copy_through_layout(theirs, ours, OPENPI_V, "vision.")
    return theirs, ours


def test_siglip_encoder_layer():
    gen = torch.Generator().manual_seed(7)
    theirs, ours = siglip_pair(8)
    x = torch.randn(3, VISION.num_tokens, VISION.width, generator=gen)
    hf_layer = next(m for m in theirs.modules() if isinstance(m, hf_siglip.SiglipEncoderLayer))
    with torch.no_grad():
        want = hf_layer(x, attention_mask=None)
        want = want[0] if isinstance(want, tuple) else want
        got = ours.layers[0](x)
    assert isinstance(ours.layers[0], SiglipLayer)
    assert_agree(got, want)


def test_siglip_vision_tower():
    gen = torch.Generator().manual_seed(9)
    theirs, ours = siglip_pair(10)
    images = torch.rand(3, 3, VISION.image_size, VISION.image_size, generator=gen) * 2 - 1  # [-1, 1]
    with torch.no_grad():
        want = theirs(pixel_values=images).last_hidden_state  # after post_layernorm, no pooling head
        got = ours(images, torch.float32)
    assert got.shape == want.shape == (3, VISION.num_tokens, VISION.width)
    assert_agree(got, want)


@pytest.mark.parametrize("fault", ["norm_plain_w", "rope_interleaved", "silu", "nomask"])
def test_the_gemma_layer_check_catches_planted_bugs(fault, monkeypatch):
    """The comparison above is not vacuous: each catalogued Gemma-layer bug breaks it."""
    monkeypatch.setitem(globals(), "NONE", Faults.parse([fault]))
    with pytest.raises(AssertionError, match="cos"):
        test_gemma_decoder_layer_with_padding_mask_and_gqa()
