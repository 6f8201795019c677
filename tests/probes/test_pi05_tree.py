"""parity.probes.pi05_tree: a user's pi0.5 with the openpi / lerobot module tree as a
backend, lined up with the bundled reference (tests/probes/tree_pi05.py is that tree,
small, written from parity's own math)."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import tree_pi05  # noqa: E402  (tests/probes is on sys.path)

import parity  # noqa: E402
from parity.probes import pi05_tree  # noqa: E402
from parity.probes.pi05.backends import pytorch  # noqa: E402
from parity.probes.pi05_tree.tree import probe_for  # noqa: E402
from parity.taps.backends import BackendOptions  # noqa: E402


def test_correct_tree_lines_up_with_the_reference_tap_by_tap():
    report = parity.compare("pytorch", "tree_pi05:correct", device="cpu")
    assert report, report.first_divergence
    assert len(report.rows) == 413 and all(r.status == "pass" for r in report.rows)
    assert report.thresholds["calibration"]["mode"] == "oracle"  # judged by calibrated budgets
    # the small tree follows the reference's rounding points: every tap equal, and parity says so
    assert any("identical to the reference" in w for w in report.warnings)


def test_same_inputs_and_names_as_the_bundled_backend():
    options = BackendOptions(device="cpu", seed=3, batch=2)
    ref, cand = pytorch(options), tree_pi05.correct(options)
    assert cand.meta["input_fingerprint"] == ref.meta["input_fingerprint"]
    assert cand.meta["dtype"] == "bfloat16" and cand.meta["arch"] == "pi05"
    taps = set(cand.probe.modules(cand.model))
    assert taps == set(ref.probe.modules(ref.model))
    assert cand.probe.modules(cand.model)["prefix.1.mlp"] == \
        "tree.model.paligemma_with_expert.paligemma.model.language_model.layers.1.mlp"
    # weights: the reference's, under the reference's names (norm offsets as 1 + w, like it)
    mine, theirs = cand.parameters(), ref.parameters()
    assert set(mine) == set(theirs)
    for name in ("prefix.layers.0.input_norm.weight", "expert.layers.3.mlp.down_proj.weight",
                 "vision.position_embedding"):
        assert torch.equal(mine[name].load().float(), theirs[name].load().float()), name
    assert cand.meta["weights"]["tree_unused"] == ["model.paligemma_with_expert.gemma_expert.lm_head.weight"]


def test_batch_of_two_with_per_camera_vision_calls():
    assert parity.compare("pytorch", "tree_pi05:correct", device="cpu", batch=2, seed=1)


def test_transformers_5_siglip_without_vision_model_level(tmp_path):
    """transformers 5.x's SiglipVisionModel has no `vision_model` child: the same taps,
    and its checkpoint is written (and read back) under the checkpoints' keys."""
    from safetensors.torch import save_file

    assert parity.compare("pytorch", "tree_pi05:flat_vision", device="cpu")
    policy = tree_pi05.flat_vision(BackendOptions(device="cpu", seed=2)).model.tree
    state = pi05_tree.checkpoint_state(policy)
    assert "model.paligemma_with_expert.paligemma.model.vision_tower.vision_model.post_layernorm.weight" in state
    save_file(state, str(tmp_path / "model.safetensors"))
    assert parity.compare("pytorch", "tree_pi05:flat_vision", device="cpu", weights=str(tmp_path))


@pytest.mark.parametrize("bug, first", [("expert_mlp", "expert.2.mlp@0"), ("prefix_nomask", "prefix.0.attn")])
def test_planted_bug_found_at_its_tap(bug, first):
    report = parity.compare("pytorch", f"tree_pi05:{bug}", device="cpu")
    assert not report
    assert report.first_divergence.key == first
    earlier = [r for r in report.rows if r.order is not None and r.order < report.first_divergence.order]
    assert earlier and all(r.status == "pass" for r in earlier)


def test_two_trees_compared_with_each_other_localise_the_bug():
    report = parity.compare("tree_pi05:correct", "tree_pi05:expert_mlp", device="cpu")
    assert report.first_divergence.key == "expert.2.mlp@0"
    assert report.localisation.introduced == "expert.2.mlp@0"


def test_shared_checkpoint_in_lerobot_layout(tmp_path):
    from safetensors.torch import save_file

    seeded = tree_pi05.correct(BackendOptions(device="cpu", seed=5))
    policy = seeded.model.tree
    state = pi05_tree.checkpoint_state(policy)
    assert all(k.startswith("model.") for k in state)  # lerobot's PI05Policy layout
    save_file(state, str(tmp_path / "model.safetensors"))
    report = parity.compare("pytorch", "tree_pi05:correct", device="cpu", weights=str(tmp_path), seed=0)
    assert report, report.first_divergence
    assert report.cand_meta["weights"]["layout"] == "lerobot"
    # seed 0's inputs on seed 5's weights: not what seed 0 alone would build
    assert report.cand_meta["input_fingerprint"] == pytorch(BackendOptions(device="cpu")).meta["input_fingerprint"]


def test_a_tree_that_does_not_fit_is_refused_with_every_problem():
    cfg = pi05_tree.config_for(BackendOptions())
    policy = tree_pi05.TreePolicy(cfg)
    del policy.model.time_mlp_in
    policy.model.extra = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError) as exc:
        pi05_tree.backend(policy, BackendOptions(device="cpu"))
    text = str(exc.value)
    assert "unexpected key extra.weight" in text and "time_mlp_in.weight" in text
    with pytest.raises(ValueError, match="not a pi0.5 tree"):
        pi05_tree.backend(torch.nn.Linear(2, 2), BackendOptions(device="cpu"))
    with pytest.raises(ValueError, match="takes no --inject"):
        pi05_tree.backend(policy, BackendOptions(device="cpu", faults=("silu",)))


def test_probe_roots():
    """Taps under openpi's / lerobot's inner model (root "") and lerobot's policy ("model.")."""
    inner, outer = probe_for(""), probe_for("model.")
    name = "paligemma_with_expert.gemma_expert.model.layers.4.self_attn.o_proj"
    assert inner.tap_for("tree." + name)[3] == "expert.4.o_proj"
    assert outer.tap_for("tree.model." + name)[3] == "expert.4.o_proj"
    assert outer.tap_for("tree." + name) is None
    assert [h.name for h in outer.taps_for("tree.model." + name)] == ["expert.4.attn", "expert.4.o_proj"]
