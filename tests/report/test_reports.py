"""Reports rendered from a diff result: JSON round trip, self-contained HTML (opened in a
real headless Chromium when one is installed), Markdown, JUnit, Model Explorer; the one
verdict banner every rendering shows; every JSON result tagged and loaded back by its tag."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from typer.testing import CliRunner

from parity.cli import app
from parity.report.html import render_html
from parity.report.junit import render_junit
from parity.report.markdown import render_markdown
from parity.report.model_explorer import node_data, tap_graph
from parity.report.results import Report
from parity.report.svg import Mark, line_chart

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, list(args), catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def nomask_json(tmp_path_factory):
    """The README's main job as a result file: pi0.5 flash_fp8 with the mask bug."""
    path = tmp_path_factory.mktemp("reports") / "nomask.json"
    code, _ = run("diff", "--ref", "pytorch", "--cand", "flash_fp8", "--inject", "nomask", "--json", str(path))
    assert code == 1
    return path


@pytest.fixture(scope="module")
def nomask(nomask_json) -> Report:
    return Report.from_dict(json.loads(nomask_json.read_text()))


def test_json_round_trip_keeps_every_key(nomask_json, nomask):
    original = json.loads(nomask_json.read_text())
    assert nomask.to_dict() == original
    assert original["format"] == "parity-report" and original["format_version"] == 1
    first = original["first_divergence"]
    assert first["tap"] == "prefix.0.attn" and nomask.first_divergence.key == "prefix.0.attn"
    row = next(t for t in original["taps"] if t["tap"] == "prefix.0.attn")
    assert set(row["regions"]) == {"camera:base_0_rgb", "camera:left_wrist_0_rgb", "text"}
    assert row["order"] is not None and row["n"] > 0


def test_html_is_one_self_contained_file(nomask):
    html = render_html(nomask)
    assert html.startswith("<!DOCTYPE html>")
    assert "<script" not in html and "<link" not in html and "src=" not in html
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", html)  # no CDN, no fetch
    assert "FIRST DIVERGENCE: prefix.0.attn" in html
    assert html.count('<svg xmlns="http://www.w3.org/2000/svg" class="chart"') == 6  # 3 stacks x (cos, rel err)
    assert "prefix: relative L2 error per layer" in html and "rel err (log)" in html
    assert 'id="all-taps"' in html and html.count("<tr class=") >= len(nomask.rows)
    assert "Region breakdown" in html and "camera:base_0_rgb" in html
    assert "Run metadata" in html and "input_fingerprint" in html


def test_log_axis_places_decades_and_keeps_zero_errors_on_the_floor():
    svg = line_chart({"a": [Mark(0, 0.0), Mark(1, 1e-6), Mark(2, 0.1, failed=True)]}, title="t", y_label="err",
                     log_y=True)
    for tick in ("1e-12", "1e-06", "0.1", "1"):
        assert f">{tick}</text>" in svg
    assert svg.count("<circle") == 3 and 'stroke="#d62728" stroke-width="2"' in svg  # the failed point is ringed


def test_markdown_for_a_pr_comment(nomask):
    md = render_markdown(nomask)
    assert md.startswith("### ❌ parity: FIRST DIVERGENCE: prefix.0.attn")
    assert "| layer | input_norm | q | k | v | attn | o_proj | post_attn_norm | mlp |" in md
    assert "| 0 | 1.000000 ✓ | 1.000000 ✓ | 1.000000 ✓ | 1.000000 ✓ | **0.874752 ✗** |" in md
    assert "<details><summary>200 failing taps</summary>" in md


def test_junit_has_one_testcase_per_tap(nomask):
    root = ET.fromstring(render_junit(nomask))
    cases = root.findall(".//testcase")
    assert len(cases) == len(nomask.rows) == int(root.get("tests"))
    failures = root.findall(".//testcase/failure")
    assert len(failures) == sum(not r.passed for r in nomask.rows) == int(root.get("failures"))
    first = next(c for c in cases if c.get("name") == "prefix.0.attn")
    assert first.get("classname") == "parity.prefix"
    assert "(first divergence)" in first.find("failure").get("message")


def test_model_explorer_node_data_and_tap_graph(nomask):
    data = node_data(nomask)
    assert data["results"]["prefix.0.attn"]["bgColor"] == "#f4a3a3"
    assert data["results"]["prefix.0.k"] == {"value": 1.0, "bgColor": "#b7e4c7"}
    assert "expert.0.attn" in data["results"]  # stepped taps: one node, worst step
    graph = tap_graph(nomask)["graphs"][0]
    ids = [n["id"] for n in graph["nodes"]]
    assert set(ids) == set(data["results"])
    node = graph["nodes"][ids.index("prefix.0.attn")]
    assert node["namespace"] == "prefix/layer_0" and node["incomingEdges"][0]["sourceNodeId"] == "prefix.0.v"


@pytest.mark.parametrize("fmt, suffix, needle", [
    ("html", ".html", "<!DOCTYPE html>"),
    ("md", ".md", "### ❌ parity"),
    ("junit", ".xml", "<testsuites"),
    ("model-explorer", ".me.json", '"results"'),
])
def test_report_command_writes_each_format(nomask_json, tmp_path, fmt, suffix, needle):
    out = tmp_path / f"r{suffix}"
    code, text = run("report", str(nomask_json), "-o", str(out), "--format", fmt)
    assert code == 0, text
    assert needle in out.read_text() and f"wrote {out}" in text.replace("\n", "")
    if fmt == "model-explorer":
        assert json.loads((tmp_path / "r.graph.json").read_text())["graphs"][0]["nodes"]


def test_report_defaults_to_the_output_dir_and_stdout_with_dash(nomask_json, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _ = run("report", str(nomask_json))
    assert code == 0 and (tmp_path / "reports" / "nomask.html").is_file()
    code, text = run("report", str(nomask_json), "--format", "md", "-o", "-")
    assert code == 0 and text.startswith("### ❌ parity")


@pytest.mark.parametrize("content, needle", [
    (None, "cannot read"),
    ("not json", "is not JSON"),
    ('{"passed": true}', "not a parity result"),
    ('{"taps": [{"tap": "x"}]}', "malformed tap entry"),
])
def test_bad_result_files_exit_2_with_one_line(tmp_path, content, needle):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    code, out = run("report", str(path), "-o", str(tmp_path / "x.html"))
    assert code == 2 and needle in out and "Traceback" not in out
    assert len([line for line in out.strip().splitlines() if line.strip()]) == 1


def test_unknown_format_exits_2(nomask_json):
    code, out = run("report", str(nomask_json), "--format", "pdf")
    assert code == 2 and "unknown format 'pdf'" in out


# --------------------------------------------------------------------------- a real browser

def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


PROBE_JS = """<script>
document.body.setAttribute('data-probe', JSON.stringify({
  charts: [...document.querySelectorAll('svg.chart')].map(s => {
      const r = s.getBoundingClientRect(); return [r.width, r.height]; }),
  lines: document.querySelectorAll('svg.chart polyline').length,
  points: document.querySelectorAll('svg.chart circle').length,
  rows: document.querySelector('#all-taps').rows.length,
  table: document.querySelector('#all-taps').getBoundingClientRect().height,
  banner: document.querySelector('#verdict').innerText}));
</script></body>"""


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium not found (Debian: apt-get install -y chromium; "
                                                 ".ci/run installs it)")
def test_html_renders_plots_and_table_in_headless_chromium(nomask, tmp_path):
    """Lay the report out in a real browser: the charts get a size, the lines and points
    exist as rendered SVG, the tap table has one row per tap.  A probe script is added to
    a copy only; the report itself has no script."""
    page = tmp_path / "report.html"
    page.write_text(render_html(nomask).replace("</body>", PROBE_JS))
    proc = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                           page.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r'data-probe="([^"]*)"', proc.stdout)
    assert found, proc.stdout[:2000]
    probe = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert len(probe["charts"]) == 6 and all(w > 300 and h > 200 for w, h in probe["charts"])
    assert probe["lines"] >= 8 and probe["points"] > 50
    assert probe["rows"] == len(nomask.rows) + 1 and probe["table"] > 1000
    assert probe["banner"].startswith("FIRST DIVERGENCE: prefix.0.attn")
    shot = tmp_path / "report.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1280,1600", page.as_uri()], capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20_000


# --------------------------------------------------------------------------- one banner, every rendering

def _wide_text(renderable) -> str:
    from rich.console import Console

    with open(os.devnull, "w") as sink:
        console = Console(width=400, color_system=None, record=True, file=sink)
        console.print(renderable)
        return console.export_text()


def test_every_rendering_says_the_same_banner_lines(nomask):
    from html import escape

    from parity.report.summary import report_banner
    from parity.report.terminal.diff import render_report
    from parity.testing import failure_message

    verdict = report_banner(nomask)
    texts = [line.text for line in verdict.lines]
    assert texts[0] == "FIRST DIVERGENCE: prefix.0.attn" and texts[-1] == "413 taps: fail 200, pass 213"
    for start in ("still matching just before it: ", "by region: ", "where: uniform", "INTRODUCED AT: prefix.0.attn",
                  "isolation: introduced at", "hint: attention ignores"):
        assert any(t.startswith(start) for t in texts), start
    terminal, message = _wide_text(render_report(nomask)), failure_message(nomask, width=400)
    html, md = render_html(nomask), render_markdown(nomask)
    junit = ET.fromstring(render_junit(nomask))
    first = next(c for c in junit.iter("testcase") if c.get("name") == "prefix.0.attn").find("failure").text
    for text in texts:
        assert text in terminal and text in message and text in first, text
        assert escape(text) in html and text.replace("|", "\\|") in md, text
    assert md.startswith(f"### ❌ parity: {texts[0]}\n")


def _captures(scale: float = 1.0):
    from parity.taps.records import Capture, Tap, TapInfo

    base = np.random.default_rng(0).standard_normal((1, 6, 4)).astype(np.float32)

    def one(x):
        infos = [TapInfo("s.0.a", "s", 0, "a"), TapInfo("s.0.b", "s", 0, "b")]
        return Capture([Tap(infos[0], 0, base, "float32", None), Tap(infos[1], 1, x, "float32", None)])

    return one(base), one(base * scale + (scale != 1.0) * np.abs(base))


def test_the_pass_line_and_run_problems_read_alike_in_every_banner():
    from parity.comparison.loop import diff
    from parity.report.results import WeightsReport
    from parity.report.summary import report_banner, weights_banner
    from parity.report.terminal.diff import render_report

    ref, cand = _captures()
    cand.taps[1].array = cand.taps[1].array * np.float32(1.0001)  # within both bounds, not equal (an
    passing = diff(ref, cand)  # equal run adds a warning line, tested in test_contamination.py)
    verdict = report_banner(passing)
    assert verdict.passed and [line.text for line in verdict.lines] == [
        "PASS: all 2 taps within thresholds (min cos 0.999, norm ratio within 0.0447 of 1)"]
    assert "PASS: all 2 taps within thresholds (min cos 0.999, norm ratio within 0.0447 of 1)" \
        in _wide_text(render_report(passing))
    assert render_markdown(passing).startswith("### ✅ parity: PASS: all 2 taps within thresholds")
    assert ('<div class="head good">PASS: all 2 taps within thresholds (min cos 0.999, norm ratio within 0.0447 '
            'of 1)</div>') in render_html(passing)
    problem = "the reference exposes no parameters: nothing was compared"
    weights = [line.text for line in weights_banner(WeightsReport(rows=[], problems=[problem])).lines]
    taps = [line.text for line in report_banner(Report(rows=[], problems=[problem])).lines]
    assert weights == [f"FAIL: {problem}", "0 parameters: "] and taps == [f"FAIL: {problem}", "0 taps: "]
    assert [line.text for line in report_banner(Report(rows=[])).lines] == ["FAIL: nothing was compared", "0 taps: "]


# --------------------------------------------------------------------------- JSON results: tags and load_result

def _every_result():
    """One of each JSON result, built by hand (no model): (result, its JSON, format)."""
    from parity.comparison.loop import diff
    from parity.comparison.stats import diff_stats
    from parity.report.results import (
        FramesResult,
        ParamResult,
        PartResult,
        Unit,
        WeightsReport,
        component_json,
    )
    from parity.taps.records import TapInfo
    from parity.taps.stats import FIELDS, StatsCapture, TapStats

    ref, cand = _captures(1.5)
    report = diff(ref, cand)

    def stats(l2: float) -> StatsCapture:  # tap s.1.x has norm l2
        def one(i: int, norm: float) -> TapStats:
            values = {"count": 24, "finite": 24, "l2": norm, "std": 1.0, "mean": 0.1, "max_abs": 2.0}
            return TapStats(TapInfo(f"s.{i}.x", "s", i, "x"), i, "float32", None, (24,), (24,), "all", "",
                            np.array([values.get(f, 0.0) for f in FIELDS]), int(norm * 1000))
        return StatsCapture([one(0, 1.0), one(1, l2)], {"backend": "toy"})

    stats_report = diff_stats(stats(1.0), stats(1.5))
    weights = WeightsReport([ParamResult("l.0.w", "pass", "", 0.99999, report.rows[0].metrics, (6, 4), (6, 4),
                                         "float32", "float32"),
                             ParamResult("l.1.w", "norm_offset", "norm offset", 0.99999, report.rows[1].metrics,
                                         (6, 4), (6, 4), "float32", "float32")],
                            thresholds={"min_cos": 0.99999, "quantized_min_cos": 0.999})
    part = PartResult(Unit("s", 0, None, "b"), [report.rows[1]], hint="a hint", ref_meta={"backend": "r"},
                      cand_meta={"backend": "c"})
    frames = FramesResult([diff(ref, ref), report], [diff(ref, cand)])
    return [(report, report.to_dict(), "parity-report"), (stats_report, stats_report.to_dict(), "parity-stats-report"),
            (weights, weights.to_dict(), "parity-weights"), (frames, frames.to_dict(), "parity-frames"),
            (part, component_json(part), "parity-component")]


def test_every_json_result_is_tagged_and_loads_back_by_its_tag():
    from parity.report.results import component_json, load_result

    for result, data, fmt in _every_result():
        data = json.loads(json.dumps(data, allow_nan=False))
        assert data["format"] == fmt and data["format_version"] == 1
        again = load_result(data)
        assert type(again) is type(result) and bool(again) == bool(result), fmt
        assert (component_json(again) if fmt == "parity-component" else again.to_dict()) == data, fmt


def test_component_json_is_the_re_run_and_both_runs():
    from parity.report.results import component_json

    part = _every_result()[-1][0]
    assert component_json(part) == {"format": "parity-component", "format_version": 1, **part.to_dict(),
                                    "ref": {"backend": "r"}, "cand": {"backend": "c"}}


def test_untagged_weights_and_frames_results_of_earlier_versions_still_load():
    from parity.report.results import FrameVerdict, load_result

    results = {fmt: (result, data) for result, data, fmt in _every_result()}
    weights, data = results["parity-weights"]
    old = {k: v for k, v in data.items() if k not in ("format", "format_version")}
    old["parameters"] = [{k: v for k, v in p.items() if k != "n"} for p in old["parameters"]]
    loaded = load_result(json.loads(json.dumps(old)))
    assert not loaded and loaded.findings[0].name == "l.1.w" and loaded.rows[0].metrics.n == 24
    frames, data = results["parity-frames"]
    old = {"passed": data["passed"], "drift": data["drift"],
           "frames": [{k: e[k] for k in ("frame", "passed", "first_divergence")} for e in data["frames"]]}
    loaded = load_result(json.loads(json.dumps(old)))
    assert [bool(f) for f in loaded.frames] == [True, False] and not loaded
    assert all(isinstance(f, FrameVerdict) for f in loaded.frames)
    assert loaded.frames[1].first_divergence.key == frames.frames[1].first_divergence.key
    assert [e["first_divergence"] for e in loaded.to_dict()["frames"]] == [e["first_divergence"] for e in old["frames"]]
    assert len(loaded.drift[0].rows) == len(frames.drift[0].rows)


@pytest.mark.parametrize("data, needle", [
    ([1, 2], "not a parity result"),
    ({"passed": True}, "not a parity result"),
    ({"format": "parity-pdf", "taps": []}, "unknown result format 'parity-pdf'"),
    ({"format": ["x"]}, "unknown result format"),
    ({"format": "parity-report", "format_version": 2, "taps": []}, "format_version 2 is not supported"),
    ({"format": "parity-weights"}, "malformed weights comparison result"),
    ({"taps": [{"tap": "x"}]}, "malformed tap entry"),
])
def test_load_result_refuses_with_one_line(data, needle):
    from parity.report.results import load_result

    with pytest.raises(ValueError, match=re.escape(needle)) as exc:
        load_result(data)
    assert "\n" not in str(exc.value)


def test_load_result_can_insist_on_one_format():
    from parity.report.results import load_result

    weights = _every_result()[2][1]
    with pytest.raises(ValueError, match=re.escape("a weights comparison result (parity-weights), not a stats diff")):
        load_result(weights, expect="parity-stats-report")
    data = _every_result()[1][1]
    stats = load_result(data, expect="parity-stats-report")
    assert not stats and stats.first_bit_difference.key == "s.1.x"
    assert ",".join(stats.suggested_taps()) == data["suggested"]["taps"] == "s.1.*,s.0.*"


def test_report_command_refuses_another_kind_of_result_with_one_line(tmp_path):
    path = tmp_path / "w.json"
    path.write_text(json.dumps(_every_result()[2][1]))
    code, out = run("report", str(path), "-o", str(tmp_path / "x.html"))
    assert code == 2 and "a weights comparison result (parity-weights), not a tensor diff result" in out
    assert len([line for line in out.strip().splitlines() if line.strip()]) == 1
