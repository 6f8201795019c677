"""The Python API refuses exactly what the CLI refuses, with the same one-line messages.

Every rule of a request lives in the library (parity.api, parity.settings, the option
and request types); the CLI only maps InputError to exit 2.  Each case here calls the
API with one bad input and would fail if its rule were removed (the request would run,
or fail some other way).  Backends are the cheap toy chain of tests/toy_backends.py.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from parity import api
from parity.errors import InputError
from parity.settings import Settings, SettingsError

TOY = "toy_backends:slow"
CPU = dict(device="cpu")


@pytest.fixture(scope="module")
def dumps(tmp_path_factory) -> dict[str, Path]:
    """A tensor dump, a stats dump, a stats diff result that suggests taps, and JSON
    files that are not one."""
    root = tmp_path_factory.mktemp("api_input")
    tensor = Path(api.run_capture(TOY, root / "toy.h5", **CPU).path)
    stats = Path(api.run_capture(TOY, root / "toy_stats.h5", stats=True, **CPU).path)
    other = root / "other.json"
    other.write_text(json.dumps({"format": "parity-report"}))
    passed = root / "passed.json"
    passed.write_text(json.dumps({"format": "parity-stats-report", "suggested": {"taps": ""}}))
    suggests = root / "suggests.json"
    suggests.write_text(json.dumps({"format": "parity-stats-report", "suggested": {"taps": "toy.1.*"}}))
    junk = root / "junk.json"
    junk.write_text("{not json")
    return {"tensor": tensor, "stats": stats, "other": other, "passed": passed, "suggests": suggests,
            "junk": junk, "root": root}


def refused(call, match: str) -> str:
    with pytest.raises(InputError) as exc:
        call()
    message = str(exc.value)
    assert match in message, message
    assert "\n" not in message, message  # one line, as the CLI prints it
    return message


# --------------------------------------------------------------------------- tap selection


def test_taps_and_taps_from_are_exclusive(dumps):
    refused(lambda: api.tap_selection("toy.*", dumps["suggests"]), "give --taps or --taps-from, not both")
    refused(lambda: api.run_diff((dumps["tensor"], dumps["tensor"]), taps="toy.*", taps_from=dumps["suggests"]),
            "give --taps or --taps-from, not both")
    refused(lambda: api.run_capture(TOY, dumps["root"] / "x.h5", taps="a", taps_from=dumps["suggests"], **CPU),
            "give --taps or --taps-from, not both")


@pytest.mark.parametrize("which, match", [
    ("missing", "cannot read"),
    ("junk", "is not JSON"),
    ("other", "is not a stats diff result"),
    ("passed", "the stats diff passed, so it suggests no taps to capture"),
])
def test_taps_from_must_be_a_stats_diff_result_that_suggests_taps(dumps, which, match):
    path = dumps["root"] / "missing.json" if which == "missing" else dumps[which]
    refused(lambda: api.suggested_taps(path), match)
    refused(lambda: api.run_capture(TOY, dumps["root"] / "x.h5", taps_from=path, **CPU), match)


def test_taps_from_gives_the_suggested_taps(dumps):
    assert api.tap_selection(None, dumps["suggests"]) == "toy.1.*"
    result = api.run_diff((dumps["tensor"], dumps["tensor"]), taps_from=dumps["suggests"])
    assert {r.key for r in result.report.rows} == {"toy.1.out"}


# --------------------------------------------------------------------------- the five diffs


def test_run_diff_chooses_the_mode(dumps):
    assert api.diff_request((dumps["tensor"], dumps["tensor"])).mode == api.DUMPS
    assert api.diff_request((dumps["stats"], dumps["stats"])).mode == api.STATS_DUMPS
    assert api.diff_request(ref=TOY, cand=TOY).mode == api.LIVE
    assert api.diff_request(ref=TOY, cand=TOY, on_device=False).mode == api.HOST
    assert api.diff_request(ref=TOY, cand=TOY, stats=True).mode == api.STATS_LIVE
    assert api.diff_request(ref=TOY, cand=TOY, stats_tol=["0.1"]).mode == api.STATS_LIVE
    offline = api.run_diff((dumps["tensor"], dumps["tensor"]))
    assert offline and not offline.stats and offline.to_dict()["passed"] is True
    stats = api.run_diff((dumps["stats"], dumps["stats"]))
    assert stats and stats.stats and stats.to_dict()["format"] == "parity-stats-report"


def test_stats_and_tensor_dumps_do_not_mix(dumps):
    for pair in ((dumps["stats"], dumps["tensor"]), (dumps["tensor"], dumps["stats"])):
        msg = refused(lambda pair=pair: api.run_diff(pair), "is a stats dump and")
        assert msg.startswith(f"{dumps['stats']} is a stats dump and {dumps['tensor']} a tensor dump")


@pytest.mark.parametrize("kwargs, flags", [
    (dict(min_cos=0.9), "--min-cos applies"),
    (dict(thresholds=["*=0.9"]), "--threshold applies"),
    (dict(by_region=True), "--by-region applies"),
    (dict(chunk=4), "--by-token applies"),
    (dict(isolate=False), "--no-isolate applies"),
    (dict(stop_at_first=True), "--stop-at-first applies"),
    (dict(on_device=False), "--host-compare applies"),
    (dict(ref_device_mb=1.0), "--ref-device-mb applies"),
    (dict(min_cos=0.9, by_region=True), "--min-cos, --by-region apply"),
])
def test_a_stats_diff_refuses_tensor_only_flags(kwargs, flags):
    refused(lambda: api.run_diff(ref=TOY, cand=TOY, stats=True, **CPU, **kwargs),
            f"{flags} to tensor diffs; a stats diff takes --stats-tol")


@pytest.mark.parametrize("tol, match", [
    (["abc"], "--stats-tol: bad value 'abc': expected VALUE or GLOB=VALUE"),
    (["2"], "--stats-tol: stats tolerance 2.0 is outside (0, 1]"),
    (["x=abc"], "--stats-tol: bad threshold 'x=abc'"),
])
def test_stats_tolerances_are_checked(dumps, tol, match):
    refused(lambda: api.stats_tolerances(tol), match)
    refused(lambda: api.run_diff((dumps["stats"], dumps["stats"]), stats_tol=tol), match)


def test_stats_diff_needs_two_dumps_or_both_backends(dumps):
    stats = dumps["stats"]
    refused(lambda: api.run_diff((stats,), ref=TOY, cand=TOY, stats=True), "give either two dumps or --ref/--cand, "
                                                                           "not both")
    refused(lambda: api.run_diff(ref=TOY, stats=True), "a live diff needs both --ref and --cand")
    refused(lambda: api.run_diff((stats,)), "give two stats dumps (REF_stats.h5 CAND_stats.h5) or --ref and --cand")
    refused(lambda: api.run_diff((stats, stats), faults=["raise"]),
            "--inject applies to a live candidate; capture it with `parity capture --stats --inject`")


def test_tensor_diff_needs_two_dumps_or_both_backends(dumps):
    t = dumps["tensor"]
    refused(lambda: api.run_diff((t,), ref=TOY, cand=TOY), "give either two dumps or --ref/--cand, not both")
    refused(lambda: api.run_diff(ref=TOY), "a live diff needs both --ref and --cand")
    refused(lambda: api.run_diff(cand=TOY), "a live diff needs both --ref and --cand")
    refused(lambda: api.run_diff((t,)), "give two dumps (REF.h5 CAND.h5) or --ref and --cand")
    refused(lambda: api.run_diff((t, t, t)), "give two dumps (REF.h5 CAND.h5) or --ref and --cand")


@pytest.mark.parametrize("kwargs, match", [
    (dict(faults=["raise"]), "--inject applies to a live candidate; capture it with `parity capture --inject`"),
    (dict(stop_at_first=True), "--stop-at-first applies to a live diff (--ref/--cand), not to two dumps"),
    (dict(on_device=False), "--host-compare applies to a live diff (--ref/--cand), not to two dumps"),
    (dict(ref_device_mb=10.0), "--ref-device-mb applies to a live diff (--ref/--cand), not to two dumps"),
    (dict(weights="ckpt.safetensors"), "--weights applies to live backends; capture each dump with"),
])
def test_two_dumps_refuse_live_only_flags(dumps, kwargs, match):
    refused(lambda: api.run_diff((dumps["tensor"], dumps["tensor"]), **kwargs), match)


@pytest.mark.parametrize("kwargs, match", [
    (dict(stop_at_first=True, on_device=False), "--stop-at-first needs the on-device compare (drop --host-compare)"),
    (dict(ref_device_mb=-1.0), "--ref-device-mb must be 0 or more, got -1.0"),
    (dict(ref_device_mb=math.nan), "--ref-device-mb must be 0 or more"),
])
def test_live_flags_are_checked(kwargs, match):
    refused(lambda: api.run_diff(ref=TOY, cand=TOY, **CPU, **kwargs), match)
    refused(lambda: api.diff_live(TOY, TOY, api.backend_options(**CPU), **kwargs), match)


def test_by_token_chunks_are_1_or_more(dumps):
    t = dumps["tensor"]
    for chunk in (0, -3):
        msg = f"--by-token must be 1 or more, got {chunk}"
        refused(lambda chunk=chunk: api.run_diff((t, t), chunk=chunk), msg)
        refused(lambda chunk=chunk: api.run_diff(ref=TOY, cand=TOY, chunk=chunk, **CPU), msg)
        refused(lambda chunk=chunk: api.diff_dumps(t, t, chunk=chunk), msg)
        cap = api.load_dump(t)
        refused(lambda chunk=chunk, cap=cap: api.compare_captures(cap, cap, chunk=chunk), msg)
    assert api.run_diff((t, t), chunk=4)


@pytest.mark.parametrize("thresholds, min_cos, match", [
    (["abc"], None, "bad threshold 'abc': expected GLOB=MIN_COS"),
    ("abc", None, "bad threshold 'abc'"),
    (["x=3"], None, "cosine threshold 3.0 is outside [0, 1]"),
    ({"x": "high"}, None, "bad threshold 'x=high'"),
    (None, 2.0, "cosine threshold 2.0 is outside [0, 1]"),
])
def test_thresholds_are_checked_everywhere(dumps, thresholds, min_cos, match):
    t = dumps["tensor"]
    refused(lambda: api.run_diff((t, t), thresholds=thresholds, min_cos=min_cos), match)
    refused(lambda: api.make_thresholds(min_cos, thresholds), match)
    refused(lambda: api.compare(TOY, TOY, thresholds=thresholds, min_cos=min_cos, **CPU), match)
    refused(lambda: api.run_component(TOY, TOY, layer=0, part="x", stack="toy", thresholds=thresholds,
                                      min_cos=min_cos, **CPU), match)
    refused(lambda: api.run_frames(TOY, TOY, frames=1, thresholds=thresholds, min_cos=min_cos, **CPU), match)
    if min_cos is None:  # weights: per parameter, its own default
        refused(lambda: api.run_weights(TOY, TOY, thresholds=thresholds, **CPU), match)


def test_quantized_min_cos_is_checked():
    refused(lambda: api.run_weights(TOY, TOY, quantized_min_cos=3.0, **CPU), "outside [0, 1]")


# --------------------------------------------------------------------------- backend options


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch=0), "batch must be >= 1"),
    (dict(seq_len=0), "seq_len must be >= 1"),
    (dict(padding="middle"), "padding must be left or right, not 'middle'"),
    (dict(weights=" "), "weights path is empty"),
])
def test_backend_options_are_checked_by_every_entry(kwargs, match):
    refused(lambda: api.backend_options(**kwargs), match)
    refused(lambda: api.run_diff(ref=TOY, cand=TOY, **kwargs), match)
    refused(lambda: api.run_diff(ref=TOY, cand=TOY, stats=True, **kwargs), match)
    refused(lambda: api.run_capture(TOY, "x.h5", **kwargs), match)
    refused(lambda: api.compare(TOY, TOY, **kwargs), match)
    if "batch" in kwargs or "weights" in kwargs:
        refused(lambda: api.run_component(TOY, TOY, layer=0, part="x", **kwargs), match)


def test_faults_are_names_split_on_commas():
    assert api.fault_names(["a,b", " c ", ""]) == ("a", "b", "c")
    assert api.backend_options(faults="x,y").faults == ("x", "y")


# --------------------------------------------------------------------------- capture


def test_capture_refuses_compression_of_a_stats_dump(dumps):
    out = dumps["root"] / "never.h5"
    refused(lambda: api.run_capture(TOY, out, stats=True, compression="gzip", **CPU),
            "--compression applies to tensor dumps; a stats dump is a few KB")
    assert not out.exists()


def test_capture_refuses_a_non_positive_inflight_budget(dumps):
    refused(lambda: api.run_capture(TOY, dumps["root"] / "never.h5", max_inflight_mb=0, **CPU),
            "--max-inflight-mb must be positive")


def test_capture_default_path_is_under_the_settings_output_dir(tmp_path):
    path = api.capture_path("hf:./m@attn=sdpa", stats=True, output_dir=tmp_path)
    assert path == tmp_path / "hf_._m_attn_sdpa_stats.h5"
    result = api.run_capture(TOY, settings=Settings(output_dir=tmp_path / "out"), **CPU)
    assert result and Path(result.path) == tmp_path / "out" / "toy_backends_slow.h5" and result.taps == 8


# --------------------------------------------------------------------------- component, frames


def test_component_needs_a_stack_when_the_probe_names_none():
    refused(lambda: api.run_component(TOY, TOY, layer=0, part="out", **CPU),
            "give --stack: the toy probe names no default stack")


def test_frames_needs_at_least_one_frame():
    for frames in (0, -1):
        refused(lambda frames=frames: api.run_frames(TOY, TOY, frames=frames, **CPU), "need at least one frame")
        refused(lambda frames=frames: api.compare_frames(TOY, TOY, api.backend_options(**CPU), frames),
                "need at least one frame")


def test_frames_refuses_an_empty_drift_selection():
    refused(lambda: api.run_frames(TOY, TOY, frames=1, drift_taps=",", **CPU), "--drift-taps ',': empty tap selection")


def test_frames_drift_taps_default_to_the_probes():
    """`parity frames` without --drift-taps: the taps the reference's probe names."""
    from dataclasses import replace

    import toy_backends

    options = api.backend_options(**CPU)
    backend = toy_backends.slow(options)
    assert api.compare_frames(backend, backend, options, 2).drift[0].rows  # no probe default: every tap
    assert len(api.compare_frames(backend, backend, options, 2).drift[0].rows) == 8
    backend.probe = replace(backend.probe, drift_taps="toy.1.*")
    drift = api.compare_frames(backend, backend, options, 2).drift[0]
    assert [r.key for r in drift.rows] == ["toy.1.out"]
    drift = api.compare_frames(backend, backend, options, 2, drift_taps="toy.2.*").drift[0]
    assert [r.key for r in drift.rows] == ["toy.2.out"]  # the flag wins


# --------------------------------------------------------------------------- report, writing, listings


def test_report_request_is_checked():
    refused(lambda: api.ReportRequest(Path("r.json"), "pdf"), "unknown format 'pdf'; known: html, md, junit, "
                                                             "model-explorer")
    refused(lambda: api.ReportRequest(Path("r.json"), "html", exported_program=Path("m.pt2")),
            "--exported-program applies to --format model-explorer")
    assert api.ReportRequest(Path("a/r.json"), "md", output_dir=Path("out")).path == Path("out/r.md")
    assert api.ReportRequest(Path("r.json"), "md", Path("-")).to_stdout


def test_model_explorer_needs_module_names_to_map_an_exported_program(dumps):
    report = api.run_diff((dumps["tensor"], dumps["tensor"])).report
    report.ref_meta.pop("modules", None)
    request = api.ReportRequest(Path("r.json"), "model-explorer", exported_program=dumps["root"] / "m.pt2")
    refused(lambda: request.render(report), "the reference run recorded no module names (ref.modules)")


def test_writing_results_says_why_it_cannot(tmp_path):
    refused(lambda: api.write_json(tmp_path / "r.json", {"cos": math.nan}), f"cannot write {tmp_path / 'r.json'}")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    refused(lambda: api.write_text(blocker / "r.json", "{}"), f"cannot write {blocker / 'r.json'}")
    api.write_json(tmp_path / "ok.json", {"a": 1})
    assert json.loads((tmp_path / "ok.json").read_text()) == {"a": 1}
    assert not (tmp_path / "ok.json.partial").exists()


def test_inspect_refuses_an_unreadable_dump(tmp_path, dumps):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    refused(lambda: api.inspect_dump(bad), str(bad))
    tensor, stats = api.inspect_dump(dumps["tensor"]), api.inspect_dump(dumps["stats"])
    assert not tensor.stats and tensor.complete and [t.key for t in tensor.taps][:2] == ["toy.0.out", "toy.1.out"]
    assert stats.stats and len(stats.taps) == 8


def test_settings_errors_are_input_errors():
    assert issubclass(SettingsError, InputError)  # malformed [tool.parity]: exit 2, like any input error
