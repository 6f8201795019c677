"""Across frames: a stale candidate fails exactly on the frames it is stale, and the
reference's own frame-to-frame drift shows the seed's picture (text K at layer 0 does not
change between frames, it does from layer 1 on; image tokens change everywhere)."""
from __future__ import annotations

from typer.testing import CliRunner

from parity.api import compare_frames
from parity.cli import app
from parity.taps.backends import BackendOptions

OPTS = BackendOptions(device="cpu")


def test_kv_reuse_fails_on_the_reused_frames_only():
    result = compare_frames("pytorch", "flash", OPTS, 3, faults=("kv_reuse",))
    assert [bool(r) for r in result.frames] == [True, False, True]
    assert not result
    # frame 1 ran on frame 0's prefix: the images it saw are the first thing that differs
    assert result.frames[1].first_divergence.key == "vision.embed"


def test_stale_vision_fails_from_frame_1_on_and_clean_flash_passes_every_frame():
    stale = compare_frames("pytorch", "flash", OPTS, 3, faults=("stale_vision",))
    assert [bool(r) for r in stale.frames] == [True, False, False]
    assert compare_frames("pytorch", "flash", OPTS, 2)


def test_drift_by_region_matches_the_seed():
    drift = compare_frames("pytorch", "flash", OPTS, 2).drift[0]
    rows = {r.key: r for r in drift.rows}
    layer0, layer1 = rows["prefix.0.k"].regions, rows["prefix.1.k"].regions
    assert layer0["text"].cos == 1.0 and layer0["text"].max_abs == 0.0  # text K at layer 0: prompt only
    assert layer1["text"].cos < 0.99  # from layer 1 on, text attends to the new images
    assert all(layer0[c].cos < 0.9 for c in layer0 if c.startswith("camera:"))


def test_frames_cli_exit_codes_and_table():
    runner = CliRunner()
    result = runner.invoke(app, ["frames", "--ref", "pytorch", "--cand", "flash", "--inject", "kv_reuse",
                                 "--frames", "2"])
    assert result.exit_code == 1 and "reference drift" in result.output and "FAIL" in result.output
    result = runner.invoke(app, ["frames", "--ref", "pytorch", "--cand", "flash", "--frames", "0"])
    assert result.exit_code == 2 and "at least one frame" in result.output
