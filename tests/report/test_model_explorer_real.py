"""parity's Model Explorer files opened in the real tool: Google's ai-edge-model-explorer
(tested with 0.1.34) loads the tap graph, the node data and an exported program, and the
page its server sends is rendered in headless Chromium.

* Its Python API: the tap graph and both node-data files are parsed strictly (no unknown
  or missing key) into Model Explorer's own dataclasses; its server is started with
  `model_explorer.visualize_from_config` (in a subprocess, on 127.0.0.1, no browser
  opened) and converts the `.pt2` with its own PyTorch adapter (`torch.export.load`):
  every node id of parity's node data is a node of that graph, the failing one inside
  the perturbed MLP.
* Chromium, driven over the DevTools protocol (`--remote-debugging-pipe`: no package
  needed), opens the page: the graph loads (a list of collections, what parity wrote
  before, fails there with "Unsupported JSON format"), the node-data panel lists every
  node with parity's value and colour, no script error is raised, and once every layer
  is expanded the screenshot of the graph holds pixels of parity's pass and fail colours.
* Model Explorer silently ignores node ids that are not in the graph (such a node only
  shows "-"), so the test counts what it matched itself: the node-data rows with a value
  and Sum / Avg of its aggregated stats must both equal the number of parity's results.
  A node-data file whose ids do not match is shown to fail that check.

The page is read through the DOM of Model Explorer 0.1.34's web app (its table classes,
the 'expand all layers' icon); another version may need them updated.

Skips without the package (`pip install ai-edge-model-explorer`; it is not in the test
extra: its adapter wheel is 128 MB, about 480 MB installed, and has no Linux-aarch64 or
Windows build) or without Chromium (Debian: apt-get install -y chromium).
"""
from __future__ import annotations

import base64
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from parity.cli import app
from parity.report.model_explorer import FAIL_COLOR, PASS_COLOR

model_explorer = pytest.importorskip(
    "model_explorer", reason="ai-edge-model-explorer is not installed (pip install ai-edge-model-explorer; "
                             "not in the test extra: its adapter wheel is 128 MB)")

HOST = "127.0.0.1"
START_TIMEOUT_S = 40
PAGE_TIMEOUT_S = 40
CDP_TIMEOUT_S = 30
MIN_COLOUR_PIXELS = 40  # a node box of the expanded 30-node graph is about 20 x 8 pixels

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


NO_CHROMIUM = "headless Chromium not found (Debian: apt-get install -y chromium; .ci/run installs it)"
needs_chromium = pytest.mark.skipif(_chromium() is None, reason=NO_CHROMIUM)


# --------------------------------------------------------------------------- the files

@pytest.fixture(scope="module")
def files(tiny_models, tmp_path_factory):
    """A tiny Llama whose layer-1 MLP is perturbed: its result, parity's tap graph and node
    data, and a `.pt2` exported as docs/hf.md says, with parity's node data for it."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    m = tiny_models("llama")
    root = tmp_path_factory.mktemp("model-explorer")
    result = root / "r.json"
    code, text = run("diff", "--ref", f"hf:{m}", "--cand", f"hf_tiny:perturbed_mlp:{m}", "--json", str(result))
    assert code == 1, text
    code, text = run("report", str(result), "--format", "model-explorer", "-o", str(root / "r.me.json"))
    assert code == 0, text
    # docs/hf.md's export: no Python constant among the program's inputs (Model Explorer's
    # PyTorch adapter fails on one: "'bool' object has no attribute 'shape'"), plain tuple
    # outputs (a ModelOutput does not load where transformers is not imported).
    model = transformers.AutoModelForCausalLM.from_pretrained(m).eval()
    model.config.use_cache = False
    model.register_forward_pre_hook(lambda mod, a, kw: (a, {**kw, "return_dict": False}), with_kwargs=True)
    ep = torch.export.export(model, (), {"input_ids": torch.ones(1, 8, dtype=torch.long)}, strict=False)
    torch.export.save(ep, root / "model.pt2")
    code, text = run("report", str(result), "--format", "model-explorer", "--exported-program",
                     str(root / "model.pt2"), "-o", str(root / "fx.me.json"))
    assert code == 0, text
    out = {"root": root, "graph": root / "r.graph.json", "data": root / "r.me.json", "pt2": root / "model.pt2",
           "fx_data": root / "fx.me.json"}
    assert all(p.is_file() for k, p in out.items() if k != "root")
    return out


def _load(path: Path):
    return json.loads(path.read_text())


def _mismatched(files) -> Path:
    """parity's node data with every id but one renamed: Model Explorer shows no error."""
    data = _load(files["data"])
    keep = "decoder.1.mlp"
    data["results"] = {(k if k == keep else f"nope.{k}"): v for k, v in data["results"].items()}
    path = files["root"] / "mismatched.me.json"
    path.write_text(json.dumps(data))
    return path


def test_model_explorer_dataclasses_take_parity_files_strictly(files):
    import dacite
    from model_explorer import graph_builder, node_data_builder

    strict = dacite.Config(strict=True)
    collection = dacite.from_dict(graph_builder.GraphCollection, _load(files["graph"]), config=strict)
    assert collection.label == "parity taps" and len(collection.graphs) == 1
    nodes = collection.graphs[0].nodes
    ids = [n.id for n in nodes]
    assert len(ids) == len(set(ids)) == 30
    assert all(e.sourceNodeId in ids for n in nodes for e in n.incomingEdges)
    for name in ("data", "fx_data"):
        data = dacite.from_dict(node_data_builder.GraphNodeData, _load(files[name]), config=strict)
        assert len(data.results) == 30 and [t.bgColor for t in data.thresholds] == [FAIL_COLOR, PASS_COLOR]
    assert set(_load(files["data"])["results"]) == set(ids)


# --------------------------------------------------------------------------- Model Explorer's server

SERVER = """
import sys
import model_explorer
config = model_explorer.config().add_model_from_path(sys.argv[1]).add_node_data_from_path(sys.argv[2])
model_explorer.visualize_from_config(config, host=sys.argv[3], port=int(sys.argv[4]), no_open_in_browser=True)
"""


def _free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port != 8080:  # Model Explorer takes 8080 as "any port from 8080 on"
            return port


def _get(url: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


@pytest.fixture(scope="module")
def server(files):
    """Model Explorer's own server, started through its Python API with the tap graph and
    parity's node data; (base URL, the page URL it printed)."""
    port = _free_port()
    log_path = files["root"] / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-u", "-c", SERVER, str(files["graph"]), str(files["data"]), HOST,
                                 str(port)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=files["root"], start_new_session=True)
    base = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        page = None
        while page is None:
            log = log_path.read_text()
            assert proc.poll() is None, f"Model Explorer's server exited {proc.returncode}: {log[-3000:]}"
            assert time.monotonic() < deadline, f"no server after {START_TIMEOUT_S} s: {log[-3000:]}"
            printed = [w for w in log.split() if w.startswith(f"{base}/?data=")]
            try:
                if printed and _get(f"{base}/check_health", timeout=2) == b"model_explorer_ok":
                    page = printed[0]
            except OSError:
                pass
            time.sleep(0.2)
        yield base, page
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """Stops a process this test started, and the children of its own session."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # what is left of its session (a browser's renderers)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=5)


def _page_url(base: str, model: Path, node_data: Path) -> str:
    """The page that opens `model` with `node_data`, built by Model Explorer's config API."""
    config = model_explorer.config().add_model_from_path(str(model)).add_node_data_from_path(str(node_data))
    return f"{base}/?data={config.to_url_param_value()}"


def _convert(base: str, model: Path) -> dict:
    """The graph Model Explorer's server makes of `model` with its own adapter, as the
    web page asks for it."""
    from model_explorer.consts import DEFAULT_SETTINGS

    cmd = {"cmdId": "convert", "extensionId": "builtin_pytorch_exportedprogram", "modelPath": str(model),
           "settings": DEFAULT_SETTINGS, "deleteAfterConversion": False}
    req = urllib.request.Request(f"{base}/apipost/v1/send_command", data=json.dumps(cmd).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        resp = json.loads(r.read())
    assert "error" not in resp, resp["error"]
    graphs = resp["graphs"]
    assert len(graphs) == 1
    return graphs[0]


def test_model_explorer_server_converts_the_exported_program_with_every_node_id(files, server):
    base, _ = server
    graph = _convert(base, files["pt2"])
    by_id = {n["id"]: n for n in graph["nodes"]}
    results = _load(files["fx_data"])["results"]
    missing = sorted(set(results) - set(by_id))
    assert not missing, f"node ids Model Explorer's own graph of the .pt2 does not hold: {missing}"
    failing = [node for node, r in results.items() if r["bgColor"] == FAIL_COLOR]
    first = by_id[failing[0]]  # in execution order: layer 1's MLP (its value: down_proj's output)
    assert "LlamaDecoderLayer_1/transformers.models.llama.modeling_llama.LlamaMLP_mlp/" in first["namespace"], \
        first["namespace"]
    assert all(by_id[n]["namespace"] != "inputs" for n in results)  # a value, never a graph input


# --------------------------------------------------------------------------- headless Chromium

class Browser:
    """Chromium over the DevTools protocol on a pipe (fds 3 and 4 of the browser)."""

    def __init__(self, exe: str, profile: Path, log: Path):
        cmd_r, self._w = os.pipe()
        self._r, out_w = os.pipe()

        def fds():  # in the child: the ends the browser uses, as fds 3 and 4, left open on exec
            a, b = os.dup(cmd_r), os.dup(out_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        with open(log, "w") as err:
            self.proc = subprocess.Popen(
                [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--enable-unsafe-swiftshader", f"--user-data-dir={profile}", "--remote-debugging-pipe",
                 "--window-size=1600,1000", "about:blank"],
                preexec_fn=fds, close_fds=False, start_new_session=True, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err)
        os.close(cmd_r)
        os.close(out_w)
        self._buf, self._id, self.events = b"", 0, []
        self.session = None

    def _recv(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise EOFError(f"Chromium closed its pipe (exit {self.proc.poll()})")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, params: dict | None = None, timeout: float = CDP_TIMEOUT_S, page: bool = True) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if page and self.session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._recv(deadline)
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]
            self.events.append(answer)

    def open(self, url: str) -> None:
        """A fresh tab on `url`; the events of the previous one are dropped."""
        target = self.call("Target.createTarget", {"url": "about:blank"}, page=False)["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 page=False)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.events = []
        self.call("Page.navigate", {"url": url})

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"script failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = PAGE_TIMEOUT_S):
        """The expression's value once truthy, or its last value after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.js(expression)
            except RuntimeError:  # the page is still navigating: no context to run in yet
                value = None
            if value or time.monotonic() > deadline:
                return value
            time.sleep(0.25)

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"])

    def errors(self, base: str) -> list[str]:
        """Script errors and error messages of the page; failed loads from other hosts
        (Google's web fonts: the machine may be offline) are not its errors."""
        out = []
        for e in self.events:
            if e.get("sessionId") != self.session:  # an earlier tab's
                continue
            p = e.get("params", {})
            if e.get("method") == "Runtime.exceptionThrown":
                out.append(json.dumps(p.get("exceptionDetails"))[:500])
            elif e.get("method") == "Runtime.consoleAPICalled" and p.get("type") == "error":
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
            elif e.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
                entry = p["entry"]
                offsite = entry.get("source") == "network" and not entry.get("url", "").startswith(base)
                if not offsite:
                    out.append(f"{entry.get('text')} ({entry.get('url')})")
        return out

    def close(self) -> None:
        try:
            self.call("Browser.close", page=False, timeout=5)
        except (OSError, RuntimeError, TimeoutError, EOFError):
            pass
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
        _stop(self.proc)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    exe = _chromium()
    if exe is None:
        pytest.skip(NO_CHROMIUM)
    root = tmp_path_factory.mktemp("chromium")
    b = Browser(exe, root / "profile", root / "chromium.log")
    try:
        b.call("Browser.getVersion", page=False)
        yield b
    finally:
        b.close()


# What the page shows, read from its DOM: the models' load status (the start page, when
# a model failed), the node-data table (Model Explorer's row order is the graph's), the
# aggregated stats of the node data, the graph's area.
PROBE = """(() => {
  const cells = r => [...r.cells].map(c => [c.innerText.trim(), c.style.backgroundColor]);
  const table = document.querySelector('table.results');
  const stats = {};
  for (const t of document.querySelectorAll('table')) {
    if (t.rows.length && t.rows[0].cells.length && t.rows[0].cells[0].innerText.trim() === 'Stat')
      for (const r of [...t.rows].slice(1)) stats[r.cells[0].innerText.trim()] = r.cells[1].innerText.trim();
  }
  const area = document.querySelector('webgl-renderer');
  const rect = area ? area.getBoundingClientRect() : null;
  return {text: document.body.innerText, models: document.querySelector('.models-table') ?
            document.querySelector('.models-table').innerText : null,
          rows: table ? [...table.rows].slice(1).map(cells) : null, stats,
          area: rect ? [rect.left, rect.top, Math.min(rect.right, innerWidth),
                        Math.min(rect.bottom, innerHeight)] : null,
          table_left: table ? table.getBoundingClientRect().left : null, width: innerWidth};
})()"""

LOADED = "!!document.querySelector('table.results tr td') || " \
         "(document.querySelector('.models-table') && /Error/.test(document.querySelector('.models-table').innerText))"

EXPAND_ALL = """(() => {
  const icon = [...document.querySelectorAll('mat-icon')].find(m => m.innerText.trim() === 'unfold_more_double');
  if (!icon) return false;
  icon.parentElement.click();
  return true;
})()"""

# Counts, in a PNG (the screenshot, decoded by the browser itself), the pixels of each
# colour within `area` (CSS pixels; the image may be at a device scale).
COUNT_PIXELS = """(async ([png, area, width, colours]) => {
  const img = new Image();
  img.src = 'data:image/png;base64,' + png;
  await img.decode();
  const scale = img.width / width;
  const [x0, y0, x1, y1] = area.map(v => Math.round(v * scale));
  const canvas = document.createElement('canvas');
  canvas.width = img.width; canvas.height = img.height;
  const ctx = canvas.getContext('2d');
  ctx.drawImage(img, 0, 0);
  const d = ctx.getImageData(x0, y0, x1 - x0, y1 - y0).data;
  const counts = colours.map(() => 0);
  for (let i = 0; i < d.length; i += 4)
    colours.forEach(([r, g, b], k) => {
      if (Math.abs(d[i] - r) <= 3 && Math.abs(d[i + 1] - g) <= 3 && Math.abs(d[i + 2] - b) <= 3) counts[k]++;
    });
  return counts;
})"""


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def overlay_problems(probe: dict | None, nodes: list[dict], data: dict) -> list[str]:
    """What is wrong with the overlay the page shows, against the graph's `nodes` (in
    order) and parity's node data `data`; [] when Model Explorer shows every result."""
    if not probe or probe["rows"] is None:
        models = probe and probe["models"]
        return [f"no node data shown; models: {models!r}" if models else "no node data shown"]
    problems = []
    results = data["results"]
    if f"{len(nodes)} nodes" not in probe["text"]:
        problems.append(f"the graph selector does not say {len(nodes)} nodes")
    stats = probe["stats"]
    try:
        total, avg = float(stats["Sum"]), float(stats["Avg"])
        matched = round(total / avg)
    except (KeyError, ValueError, ZeroDivisionError):
        problems.append(f"no aggregated stats: {stats}")
    else:
        if matched != len(results):
            problems.append(f"Model Explorer matched {matched} of the {len(results)} node ids")
        values = [r["value"] for r in results.values()]
        if abs(float(stats["Min"]) - min(values)) > 1e-9 or abs(float(stats["Max"]) - max(values)) > 1e-9:
            problems.append(f"aggregated min/max {stats['Min']}/{stats['Max']} are not parity's")
    rows = probe["rows"]
    if len(nodes) <= 50:  # the table pages at 50 rows
        if len(rows) != len(nodes):
            problems.append(f"{len(rows)} rows in the node-data table for {len(nodes)} nodes")
        rows = [row if len(row) >= 3 else [*row, ["", ""], ["", ""]] for row in rows]  # [#, node, value]
        shown = sum(row[2][0] not in ("-", "") for row in rows)
        if shown != len(results):
            problems.append(f"{shown} of {len(results)} results shown in the node-data table")
        for node, row in zip(nodes, rows):
            (label, _), (value, colour) = row[1], row[2]
            want = results.get(node["id"])
            if label != node["label"]:
                problems.append(f"row for {node['id']} says {label!r}")
            elif want is not None and (value == "-" or abs(float(value) - want["value"]) > 1e-9
                                       or colour != "rgb({}, {}, {})".format(*_rgb(want["bgColor"]))):
                problems.append(f"{node['id']}: shown {value} on {colour}, parity wrote {want}")
    return problems


def _show(browser: Browser, url: str) -> dict:
    browser.open(url)
    loaded = browser.wait_for(LOADED)
    probe = browser.js(PROBE)
    assert loaded, f"nothing loaded in {PAGE_TIMEOUT_S} s: {probe['text'][:1000]}"
    if probe["rows"] is not None:  # the table may fill a moment after its first row
        probe = browser.wait_for(f"(() => {{ const p = {PROBE}; return p.stats.Sum ? p : null; }})()", timeout=10) \
            or probe
    return probe


def _colour_pixels(browser: Browser, probe: dict, shot: Path, expand: bool = True) -> dict[str, int]:
    """Expands every layer (unless not `expand`: a large graph's expanded nodes are too
    small to hold a pixel of their own colour; a collapsed layer shows its children's
    colours in a bar), screenshots the page into `shot`, and counts the pixels of parity's
    pass and fail colours in the graph's area."""
    # the side panel's coloured table cells lie outside the area counted
    assert probe["area"] and probe["area"][2] <= probe["table_left"], probe["area"]
    if expand:
        assert browser.js(EXPAND_ALL), "no 'expand all layers' button"
    deadline, last = time.monotonic() + 15, None
    while True:  # the layout and the WebGL frame take a moment: until two shots agree
        time.sleep(0.5)
        png = browser.screenshot()
        args = [base64.b64encode(png).decode(), probe["area"], probe["width"], [_rgb(PASS_COLOR), _rgb(FAIL_COLOR)]]
        counts = browser.js(f"({COUNT_PIXELS})({json.dumps(args)})")
        if (counts == last and max(counts) > 0) or time.monotonic() > deadline:
            break
        last = counts
    shot.write_bytes(png)
    return {"pass": counts[0], "fail": counts[1]}


@needs_chromium
def test_tap_graph_and_node_data_render_in_chromium(files, server, browser, tmp_path):
    base, page = server
    probe = _show(browser, page)  # the page Model Explorer's Python API printed
    assert probe["rows"] is not None, f"the graph did not load; models: {probe['models']!r}"
    nodes = _load(files["graph"])["graphs"][0]["nodes"]
    data = _load(files["data"])
    assert overlay_problems(probe, nodes, data) == []
    assert "r.me.json" in probe["text"]  # the node-data provider panel names the file
    pixels = _colour_pixels(browser, probe, tmp_path / "tap-graph.png")
    assert pixels["pass"] >= MIN_COLOUR_PIXELS and pixels["fail"] >= MIN_COLOUR_PIXELS, pixels
    assert browser.errors(base) == []


@needs_chromium
def test_node_ids_that_match_nothing_are_caught(files, server, browser, tmp_path):
    """Model Explorer shows no error for them: the check against what it matched does."""
    base, _ = server
    nodes = _load(files["graph"])["graphs"][0]["nodes"]
    bad = _mismatched(files)
    probe = _show(browser, _page_url(base, files["graph"], bad))
    assert browser.errors(base) == []  # nothing on the page says so
    problems = overlay_problems(probe, nodes, _load(bad))
    assert "Model Explorer matched 1 of the 30 node ids" in problems
    assert "1 of 30 results shown in the node-data table" in problems
    pixels = _colour_pixels(browser, probe, tmp_path / "mismatched.png")
    assert pixels["pass"] < MIN_COLOUR_PIXELS <= pixels["fail"], pixels  # one red node, nothing green


@needs_chromium
def test_exported_program_and_its_node_data_render_in_chromium(files, server, browser, tmp_path):
    base, _ = server
    nodes = _convert(base, files["pt2"])["nodes"]
    data = _load(files["fx_data"])
    probe = _show(browser, _page_url(base, files["pt2"], files["fx_data"]))
    assert overlay_problems(probe, nodes, data) == []
    pixels = _colour_pixels(browser, probe, tmp_path / "exported-program.png", expand=False)
    assert pixels["pass"] >= MIN_COLOUR_PIXELS and pixels["fail"] >= MIN_COLOUR_PIXELS, pixels
    assert browser.errors(base) == []
