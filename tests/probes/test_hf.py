"""Any local transformers model: tiny random checkpoints built from configs, saved with
save_pretrained (no downloads), compared across attention implementations, dtypes,
paddings; a planted bug is named at its layer and component."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")

import parity  # noqa: E402
from parity.api import capture_live  # noqa: E402
from parity.comparison.align import gather_tokens  # noqa: E402
from parity.errors import InputError
from parity.taps.backends import BackendOptions  # noqa: E402


def spec(path, **opts) -> str:
    return f"hf:{path}" + ("@" + ",".join(f"{k}={v}" if v is not True else k for k, v in opts.items()) if opts else "")


@pytest.mark.parametrize("kind", ["llama", "gemma", "qwen2", "phi3"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_eager_vs_sdpa_fp32_passes(tiny_models, kind, padding):
    m = tiny_models(kind)
    report = parity.compare(spec(m, attn="eager", dtype="float32"), spec(m, attn="sdpa", dtype="float32"),
                            batch=3, padding=padding, seed=1)
    assert report, report.first_divergence
    names = {r.info.name for r in report.rows}
    for layer in range(3):
        for comp in ("input_norm", "q", "k", "v", "attn", "o_proj", "post_attn_norm", "mlp", "out"):
            assert f"decoder.{layer}.{comp}" in names
    assert {"decoder.embed", "decoder.final_norm", "output.logits"} <= names
    assert min(r.cos for r in report.rows) > 0.99999


def test_pad_positions_differ_but_are_dont_care(tiny_models):
    """The known eager-vs-sdpa difference at left-padding positions is real in the raw
    tensors, and not reported: pad slots are -1 in the layout."""
    m = tiny_models("llama")
    opts = BackendOptions(batch=3, padding="left", seed=1)
    eager = capture_live(spec(m, attn="eager", dtype="float32"), opts)
    sdpa = capture_live(spec(m, attn="sdpa", dtype="float32"), opts)
    layout = eager.layouts["tokens"]
    pad = layout.slots < 0
    assert pad.any() and (layout.slots >= 0).any()
    a, b = eager.by_key()["output.logits"].array, sdpa.by_key()["output.logits"].array
    assert np.abs(a[pad] - b[pad]).max() > 1e-3  # real divergence at padding...
    va, _ = gather_tokens(a, layout)
    vb, _ = gather_tokens(b, sdpa.layouts["tokens"])
    assert np.abs(va - vb).max() < 1e-5  # ...none where it matters
    assert parity.api.compare_captures(eager, sdpa)


def test_left_and_right_padding_compare_position_by_position(tiny_models):
    m = tiny_models("qwen2")
    report = parity.compare(spec(m, padding="left"), spec(m, padding="right"), batch=4, seed=2)
    assert report, report.first_divergence
    assert report.ref_meta["input_fingerprint"] == report.cand_meta["input_fingerprint"]
    assert (report.ref_meta["padding"], report.cand_meta["padding"]) == ("left", "right")


def test_planted_mlp_bug_is_localised_to_layer_1_mlp(tiny_models):
    m = tiny_models("llama")
    report = parity.compare(spec(m, attn="eager"), f"hf_tiny:perturbed_mlp:{m}@attn=sdpa", batch=2,
                            padding="left")
    assert not report
    first = report.first_divergence
    assert (first.info.stack, first.info.layer, first.info.component) == ("decoder", 1, "mlp")
    rows = {r.key: r for r in report.rows}
    assert all(rows[f"decoder.0.{c}"].passed for c in ("q", "attn", "mlp", "out"))
    assert rows["decoder.1.post_attn_norm"].passed and not rows["decoder.1.out"].passed


def test_fused_qkv_is_split_into_q_k_v(tiny_models):
    cap = capture_live(spec(tiny_models("phi3")), BackendOptions(batch=2, seq_len=8))
    taps = cap.by_key()
    heads, kv_heads, head_dim = 4, 2, 8
    assert taps["decoder.0.q"].shape == (2, 8, heads * head_dim)
    assert taps["decoder.0.k"].shape == (2, 8, kv_heads * head_dim)
    assert taps["decoder.0.v"].shape == (2, 8, kv_heads * head_dim)
    order = [t.info.component for t in cap.taps if t.info.layer == 0]
    assert order[:5] == ["input_norm", "q", "k", "v", "attn"]


def test_gemma2_norms_have_their_own_taps(tiny_models):
    m = tiny_models("gemma2")  # transformers has no SDPA path for Gemma2: eager fp32 vs eager fp64
    report = parity.compare(spec(m, dtype="float32"), spec(m, dtype="float64"), batch=2)
    assert report, report.first_divergence
    comps = [r.info.component for r in report.rows if r.info.layer == 0]
    assert comps == ["input_norm", "q", "k", "v", "attn", "o_proj", "post_attn_norm", "pre_mlp_norm", "mlp",
                     "post_mlp_norm", "out"]
    assert report.thresholds["exact_dtypes"] is False


@pytest.mark.parametrize("kind", ["siglip", "vit"])
def test_vision_encoders_eager_vs_sdpa(tiny_models, kind):
    m = tiny_models(kind)
    report = parity.compare(spec(m, attn="eager"), spec(m, attn="sdpa"), batch=2)
    assert report, report.first_divergence
    names = {r.info.name for r in report.rows}
    assert {"vision.embed", "vision.0.q", "vision.1.attn", "vision.1.mlp", "vision.final_norm"} <= names


def test_paligemma_vision_projector_and_prefix_decoder(tiny_models):
    m = tiny_models("paligemma")
    report = parity.compare(spec(m, attn="eager"), spec(m, attn="sdpa"), batch=2, padding="left")
    assert report, report.first_divergence
    names = [r.info.name for r in report.rows]
    assert names.index("vision.projector") < names.index("decoder.0.q")
    cap = capture_live(spec(m), BackendOptions(batch=2))
    assert [r.name for r in cap.layouts["tokens"].regions] == ["image", "text"]
    assert cap.layouts["tokens"].regions[0].stop == 16  # (16 / 4) ** 2 image tokens


def test_bf16_candidate_against_fp32_reference_judges_values(tiny_models):
    m = tiny_models("llama")
    report = parity.compare(spec(m, attn="eager", dtype="float32"), spec(m, attn="sdpa", dtype="bfloat16"),
                            batch=2, min_cos=0.99)
    assert report, report.first_divergence
    assert report.rows[0].cand_dtype == "bfloat16"
    strict = parity.compare(spec(m, dtype="float32"), spec(m, dtype="bfloat16"), batch=2, min_cos=0.9999999)
    assert not strict and strict.first_divergence.status == "fail"


def test_compiled_candidate(tiny_models):
    m = tiny_models("llama")
    report = parity.compare(spec(m), spec(m, compile="aot_eager"), batch=2, taps="decoder.1.*,output.*")
    assert report, report.first_divergence
    assert report.cand_meta["compile"] == "aot_eager"


# --------------------------------------------------------------------------- inputs

def test_inputs_from_json_npy_and_memory_agree(tiny_models, tmp_path):
    m = tiny_models("llama")
    rows = [[5, 6, 7, 8, 9], [10, 11, 12]]
    (tmp_path / "ids.json").write_text(json.dumps(rows))
    padded = np.array([[5, 6, 7, 8, 9], [-1, -1, 10, 11, 12]])
    np.save(tmp_path / "ids.npy", padded)
    masked = {"input_ids": [[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]], "attention_mask": [[1] * 5, [1, 1, 1, 0, 0]]}
    prints = set()
    for inputs in (str(tmp_path / "ids.json"), tmp_path / "ids.npy", rows, masked, padded):
        cap = capture_live(spec(m), BackendOptions(inputs=inputs, padding="left"), taps="decoder.embed")
        prints.add(cap.meta["input_fingerprint"])
        assert cap.taps[0].shape == (2, 5, 32)
    assert len(prints) == 1


@pytest.mark.parametrize("inputs, needle", [
    ([[5, 6, 999]], "outside the vocabulary"),
    ({"input_ids": [[5, 6, 7]], "attention_mask": [[1, 0, 1]]}, "padding in the middle"),
    ("nope.json", "does not exist"),
    ([[]], "has no tokens"),
    ("x.txt", "does not exist"),
    (np.zeros((1, 3, 16, 16), dtype=np.float32), "takes token ids, not images"),
])
def test_bad_inputs_are_one_line_input_errors(tiny_models, inputs, needle):
    with pytest.raises(InputError, match=needle) as exc:
        parity.compare(spec(tiny_models("llama")), spec(tiny_models("llama")), inputs=inputs)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("arg, needle", [
    ("@attn=eager", "no model path"),
    ("{m}@color=red", "unknown hf option 'color'"),
    ("{m}@dtype=float12", "unknown dtype"),
    ("{m}@padding=middle", "padding must be left or right"),
    ("/no/such/model", "is not a saved transformers model"),
])
def test_bad_hf_specs(tiny_models, arg, needle):
    with pytest.raises(InputError, match=needle):
        parity.compare("hf:" + arg.format(m=tiny_models("llama")), "hf:" + arg.format(m=tiny_models("llama")))


def test_hf_refuses_pi05_faults_and_pi05_refuses_inputs(tiny_models):
    with pytest.raises(InputError, match="no fault catalogue"):
        parity.compare(spec(tiny_models("llama")), spec(tiny_models("llama")), faults=["nomask"])
    with pytest.raises(InputError, match="apply to hf backends"):
        parity.compare("pytorch", "flash", padding="left")


def test_no_hook_is_left_on_the_model(tiny_models):
    from parity.capture.recorder import capture
    from parity.taps.backends import resolve

    backend = resolve(spec(tiny_models("llama")), BackendOptions())
    capture(backend)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in backend.model.modules())


@pytest.mark.parametrize("kind", ["gemma3", "qwen3"])
@pytest.mark.parametrize("cand", ["attn=sdpa,dtype=float32", "attn=eager,dtype=bfloat16"])
def test_per_head_qk_norms_pass_before_and_after_the_transpose(tiny_models, kind, cand):
    """Gemma-3 normalises q/k as [B, heads, T, D] (after the transpose), Qwen3 as
    [B, T, heads, D]: both taps fit the token layout, and correct pairs pass."""
    m = tiny_models(kind)
    report = parity.compare(spec(m, attn="eager", dtype="float32"), f"hf:{m}@{cand}", batch=3, padding="left")
    assert report, report.first_divergence
    norms = [r for r in report.rows if r.info.component in ("q_norm", "k_norm")]
    assert len(norms) == 2 * 3 and all(r.status == "pass" for r in norms)
    if "bfloat16" in cand:  # a dtype asked for: the reference's fp32 rounding is no budget for bf16
        assert "computes in bfloat16" in report.thresholds["calibration"]["why"]


def test_an_undeclared_family_with_llama_layers_says_so_in_the_header(tmp_path):
    """Granite is not declared; its Llama-style layers get the generic decoder rules, and
    the terminal header says which rules tapped it."""
    import transformers as T
    from hf_tiny import TEXT

    from parity.report.terminal.diff import header

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    T.GraniteForCausalLM(T.GraniteConfig(**TEXT)).save_pretrained(tmp_path / "granite")
    report = parity.compare(spec(tmp_path / "granite", attn="eager"), spec(tmp_path / "granite", attn="sdpa"), batch=2)
    assert report, report.first_divergence
    assert "ref tapped by the generic decoder (model_type 'granite' is not declared)" in header(report).plain
