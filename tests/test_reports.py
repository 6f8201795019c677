"""Reports rendered from a diff result: JSON round trip, self-contained HTML (opened in a
real headless Chromium when one is installed), Markdown, JUnit, Model Explorer."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

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
    assert "<details><summary>321 failing taps</summary>" in md


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
    graph = tap_graph(nomask)[0]["graphs"][0]
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
        assert json.loads((tmp_path / "r.graph.json").read_text())[0]["graphs"][0]["nodes"]


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
