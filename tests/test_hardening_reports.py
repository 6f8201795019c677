"""Adversarial inputs to the reports and the files parity writes: nothing in an input runs
as code, what a dump or result says is shown as data, output paths that are not regular
files are written through or refused (never replaced), big results render in linear
time, and a malformed result is one line and exit 2.  Every input is built here (json,
numpy, h5py, zipfile)."""
from __future__ import annotations

import contextlib
import copy
import html.parser
import json
import os
import pickle
import stat
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from parity.cli import app
from parity.report.html import render_html
from parity.report.junit import render_junit
from parity.report.markdown import render_markdown
from parity.report.results import Report, TapResult
from parity.taps.records import TapInfo

REPO = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = Path(sys.executable).with_name("parity")  # what users run: sys.path[0] is the venv's bin
runner = CliRunner()


def run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def one_error_line(out: str) -> str:
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    return lines[0]


# --------------------------------------------------------------------------- results built by hand


def tap_entry(order: int, name: str = "dec.0.mlp", stack: str = "dec", layer: int | None = 0,
              component: str = "mlp", passed: bool = True, **over) -> dict:
    entry = {"tap": name, "order": order, "name": name, "stack": stack, "layer": layer, "component": component,
             "step": None, "cos": 1.0 if passed else 0.5, "max_abs": 0.0 if passed else 0.4, "mean_abs": 0.0,
             "rel_l2": 0.0 if passed else 0.3, "nan_ref": 0, "nan_cand": 0, "inf_ref": 0, "inf_cand": 0,
             "threshold": 0.999, "status": "pass" if passed else "fail",
             "reason": "" if passed else "cos 0.500000 < 0.999", "ref_shape": [1, 4, 8], "cand_shape": [1, 4, 8],
             "ref_dtype": "float32", "cand_dtype": "float32", "n": 32,
             "regions": {"text": {"n": 32, "cos": 1.0 if passed else 0.5, "max_abs": 0.0, "mean_abs": 0.0,
                                  "rel_l2": 0.0}}}
    entry.update(over)
    return entry


def result(taps: list[dict] | None = None, **over) -> dict:
    taps = taps if taps is not None else [
        tap_entry(0, "dec.0.attn", component="attn"), tap_entry(1, "dec.0.mlp"),
        tap_entry(2, "dec.1.attn", layer=1, component="attn", passed=False), tap_entry(3, "dec.1.mlp", layer=1),
        tap_entry(4, "head", stack="head", layer=None, component="out")]
    d = {"format": "parity-report", "format_version": 1, "passed": False, "first_divergence": None, "problems": [],
         "counts": {}, "thresholds": {"min_cos": 0.999, "patterns": [], "exact_dtypes": []},
         "ref": {"backend": "ref", "device": "cpu", "dtype": "float32",
                 "modules": {"dec.0.attn": "a", "dec.0.mlp": "b", "dec.1.attn": "a", "dec.1.mlp": "b"}},
         "cand": {"backend": "cand", "device": "cpu", "dtype": "float32"},
         "candidate_error": None, "isolation": None, "taps": taps}
    d.update(over)
    return d


def write_result(tmp_path: Path, d: dict | str, name: str = "r.json") -> Path:
    path = tmp_path / name
    path.write_text(d if isinstance(d, str) else json.dumps(d))
    return path


# --------------------------------------------------------------------------- 1. no unpickling


class _Trap:
    """Unpickled, it creates `marker`: the payload of a crafted archive."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _exported_program(tmp_path: Path):
    """A small module exported and saved: two Linear (module paths a, b), a split."""
    torch = pytest.importorskip("torch")

    class Split(torch.nn.Module):
        def forward(self, x):
            first, second = torch.split(x, 2, dim=-1)
            return first * second

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), Split()

        def forward(self, x):
            return self.c(self.b(torch.relu(self.a(x))))

    ep = torch.export.export(M(), (torch.ones(2, 4),))
    path = tmp_path / "m.pt2"
    torch.export.save(ep, path)
    return ep, path


def _booby_trap(archive: Path, out: Path, marker: Path) -> Path:
    """`archive` with its first weight marked use_pickle and replaced by a pickle that
    creates `marker` when loaded (torch.export.load reads such weights with
    torch.load(weights_only=False))."""
    with zipfile.ZipFile(archive) as src:
        members = {info.filename: src.read(info) for info in src.infolist()}
    config_name = next(name for name in members if name.endswith("weights/model_weights_config.json"))
    config = json.loads(members[config_name])
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    members[config_name] = json.dumps(config).encode()
    weight = next(name for name in members if name.endswith(f"weights/{first['path_name']}"))
    members[weight] = pickle.dumps(_Trap(marker), protocol=2)
    return _zip(out, members)


def test_the_booby_trapped_archive_runs_code_when_torch_loads_it(tmp_path):
    """The trap the next test relies on is armed: torch.export.load runs it."""
    torch = pytest.importorskip("torch")
    _, path = _exported_program(tmp_path)
    marker = tmp_path / "ran"
    evil = _booby_trap(path, tmp_path / "evil.pt2", marker)
    with contextlib.suppress(Exception):  # whatever torch makes of the payload's result, the payload ran
        torch.export.load(evil)
    assert marker.exists()


def test_exported_program_is_read_without_unpickling_it(tmp_path):
    _, path = _exported_program(tmp_path)
    marker = tmp_path / "ran"
    evil = _booby_trap(path, tmp_path / "evil.pt2", marker)
    out = tmp_path / "r.me.json"
    code, text = run("report", str(write_result(tmp_path, result())), "--format", "model-explorer",
                     "--exported-program", str(evil), "-o", str(out))
    assert not marker.exists(), "reading the .pt2 ran code from it"
    assert code == 0, text
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"linear", "linear_1"}  # taps of module a -> its linear, of b -> linear_1
    assert results["linear"]["bgColor"] == "#f4a3a3"  # dec.1.attn (module a) failed


def test_exported_program_needs_no_torch(tmp_path):
    """The archive's graph is JSON: a process where torch cannot be imported maps it."""
    _, path = _exported_program(tmp_path)
    r = write_result(tmp_path, result())
    out = tmp_path / "r.me.json"
    code = ("import sys; sys.modules['torch'] = None; from parity.cli import main; "
            f"sys.argv = ['parity', 'report', {str(r)!r}, '-f', 'model-explorer', '--exported-program', "
            f"{str(path)!r}, '-o', {str(out)!r}]; main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(out.read_text())["results"]) == {"linear", "linear_1"}


def test_the_archive_graph_is_the_graph_torch_loads(tmp_path):
    """Node names, the nodes each reads and the modules each was recorded in, as read from
    the archive's JSON, equal torch's own deserialised program (a trusted file here)."""
    torch = pytest.importorskip("torch")
    from parity.report.exported_program import nodes_of_exported_program, read_graph
    from parity.report.model_explorer import node_ids_from_exported_program, node_ids_from_graph

    _, path = _exported_program(tmp_path)
    loaded = torch.export.load(path)
    ours, theirs = read_graph(path), nodes_of_exported_program(loaded)
    assert [(n.name, n.inputs, n.modules, n.placeholder) for n in ours] == \
        [(n.name, n.inputs, n.modules, n.placeholder) for n in theirs if n.name != "output"]
    assert any(n.name == "getitem_1" and n.modules[-1] == "c" for n in ours)  # split's outputs are their own nodes
    modules = {"t.a": "a", "t.b": "b", "t.c": "c", "t.b_in": "b:input", "t.c_in": "c:input", "t.none": "zz"}
    ids = node_ids_from_graph(ours, modules)
    assert ids == node_ids_from_exported_program(loaded, modules)
    assert ids == {"t.a": "linear", "t.b": "linear_1", "t.c": "mul", "t.b_in": "relu", "t.c_in": "linear_1"}


def test_a_transformers_models_archive_graph_is_the_graph_torch_loads(tiny_models, tmp_path):
    """The same on a real decoder (literal inputs such as use_cache become placeholders too)."""
    torch = pytest.importorskip("torch")
    import transformers

    from parity.report.exported_program import nodes_of_exported_program, read_graph

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models("llama")).eval()
    ep = torch.export.export(model, (), {"input_ids": torch.ones(1, 8, dtype=torch.long), "use_cache": False,
                                         "return_dict": False}, strict=False)
    torch.export.save(ep, tmp_path / "m.pt2")
    ours = [(n.name, n.inputs, n.modules, n.placeholder) for n in read_graph(tmp_path / "m.pt2")]
    theirs = [(n.name, n.inputs, n.modules, n.placeholder)
              for n in nodes_of_exported_program(torch.export.load(tmp_path / "m.pt2")) if n.name != "output"]
    assert ours == theirs and ("use_cache", (), (), True) in ours


def _zip(path: Path, members: dict[str, bytes | str]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


@pytest.mark.parametrize(("members", "words"), [
    (None, "not a readable .pt2 archive"),
    ({"m/data/weights/w": b"x"}, "no exported program in it"),
    ({"m/models/model.json": "{not json"}, "is not JSON"),
    ({"m/models/model.json": "[" * 100_000 + "]" * 100_000}, "nested too deeply"),
    ({"m/models/model.json": json.dumps({"graph_module": {"graph": {"inputs": [], "nodes": 5}}})},
     "not a torch.export graph"),
    ({"m/models/model.json": json.dumps({"graph_module": {"graph": {"inputs": [], "nodes": [
        {"target": "t", "inputs": [], "outputs": [], "metadata": {"nn_module_stack": 7}}]}}})},
     "not a torch.export graph"),
])
def test_a_malformed_archive_is_one_line_exit_2(tmp_path, members, words):
    pt2 = tmp_path / "m.pt2"
    if members is None:
        pt2.write_bytes(b"PK\x03\x04 not really a zip")
    else:
        _zip(pt2, members)
    code, out = run("report", str(write_result(tmp_path, result())), "-f", "model-explorer",
                    "--exported-program", str(pt2), "-o", str(tmp_path / "o.json"))
    assert code == 2 and words in one_error_line(out) and str(pt2) in out


# --------------------------------------------------------------------------- 2. no shadowing from the cwd


def _bomb(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\nraise SystemExit(99)\n")


def _tiny_dump(path: Path) -> Path:
    from parity.dump.writer import write_dump
    from parity.taps.records import Capture, Tap

    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    write_dump(path, Capture([Tap(TapInfo("s.0.a", "s", 0, "a"), 0, x, "float32")], meta={"backend": "t"}))
    return path


def test_modules_in_the_current_directory_do_not_shadow_installed_ones(tmp_path):
    """An `h5py.py` or an `xml/` package next to the user's files never runs."""
    marker = tmp_path / "shadowed"
    work = tmp_path / "work"
    _bomb(work / "h5py.py", marker)
    _bomb(work / "xml" / "__init__.py", marker)
    dump, r = _tiny_dump(tmp_path / "d.h5"), write_result(tmp_path, result())
    for args in (["inspect", str(dump)], ["report", str(r), "-f", "junit", "-o", str(tmp_path / "r.xml")]):
        proc = subprocess.run([str(CONSOLE_SCRIPT), *args], cwd=work, capture_output=True, text=True, timeout=120)
        assert not marker.exists(), f"parity {args[0]} imported a module from the current directory"
        assert proc.returncode == 0, proc.stderr
    ET.parse(tmp_path / "r.xml")


FACTORY = """
import xml.dom.minidom  # installed (stdlib): must not come from ./xml

from parity.taps.backends import Backend
from parity.taps.probe import Probe


def make(options):
    return Backend("mine", None, Probe("mine", ()), run=lambda: None, layouts=dict, meta={"backend": "mine"})
"""


def test_a_user_spec_loads_from_the_current_directory_without_shadowing(tmp_path, monkeypatch):
    """`package.module:factory` from the current directory still works, with that
    directory appended to sys.path only while the spec is imported."""
    from parity.taps.backends import BackendOptions, resolve

    marker = tmp_path / "shadowed"
    (tmp_path / "my_backend_mod.py").write_text(FACTORY)
    _bomb(tmp_path / "xml" / "__init__.py", marker)
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    backend = resolve("my_backend_mod:make", BackendOptions())
    assert backend.name == "mine" and not marker.exists()
    assert sys.path == before  # nothing left behind
    sys.modules.pop("my_backend_mod", None)


@pytest.mark.parametrize(("spec", "words"), [
    ("os:system", "is not a backend factory"), ("builtins:id", "returned int, not a Backend"),
    ("collections:OrderedDict", "is not a backend factory"), ("json:loads", "raised TypeError"),
    ("os:getcwd", "needs an argument")])
def test_a_callable_that_is_not_a_backend_factory_is_one_line_exit_2(tmp_path, spec, words):
    code, out = run("capture", "--backend", spec, "-o", str(tmp_path / "x.h5"))
    assert code == 2 and words in one_error_line(out), out
    assert not (tmp_path / "x.h5").exists()


# --------------------------------------------------------------------------- 4. reports show data as data

BIDI, ESC = "\u202e", "\x1b"
INJECTED = {
    "backend": "evil</code><img src=x onerror=alert(1)>` **PASS**",
    "name": "x\n\n### ✅ parity: PASS\n<img src=x onerror=alert(2)>",
    "stack": "s<script>alert(3)</script>",
    "component": "c|d_",
    "reason": (f"cos 0.5 < 0.999 <img src=y onerror=alert(4)> [ok](javascript:alert(5)) ![i](http://e/x.png) "
               f"$\\color{{green}}PASS$ &lt;b&gt; {BIDI}evil {ESC}[2J \\<img src=z onerror=alert(6)>"),
}


def _injected_result(tmp_path: Path) -> Path:
    bad = tap_entry(1, INJECTED["name"], stack=INJECTED["stack"], layer=0, component=INJECTED["component"],
                    passed=False, reason=INJECTED["reason"], status="fail\n# PASS",
                    regions={f"r<img src=q>{BIDI}": {"n": 1, "cos": 0.5, "max_abs": 1, "mean_abs": 1, "rel_l2": 1}})
    d = result([tap_entry(0, "ok.0.a", stack="ok", component="a"), bad,
                tap_entry(2, f"lvl{ESC}[31m<b>", stack="lvl", layer=None, component="o", passed=False,
                          reason=INJECTED["reason"])],
               problems=[f"problem <img src=p onerror=alert(7)>\n### PASS {BIDI}"])
    d["ref"]["backend"] = INJECTED["backend"]
    d["cand"] = {"backend": f"c{BIDI}{ESC}", "note": "<script>alert(8)</script>\n| a | b |"}
    return write_result(tmp_path, d)


class _Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def _tags(markup: str) -> _Tags:
    parser = _Tags()
    parser.feed(markup)
    return parser


def test_markdown_report_shows_injected_markup_as_text(tmp_path):
    from markdown_it import MarkdownIt

    code, md = run("report", str(_injected_result(tmp_path)), "--format", "md", "-o", "-")
    assert code == 0
    assert BIDI not in md and ESC not in md
    rendered = MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(md)  # raw HTML on, as GitHub
    parsed = _tags(rendered)
    assert not {"img", "script", "a", "h1", "h2", "h4", "h5", "h6", "em", "s", "del", "hr"} & set(parsed.tags), \
        parsed.tags
    assert parsed.tags.count("h3") == 1 and rendered.startswith("<h3>❌ parity:")
    text = "".join(parsed.text)
    for shown in ("` **PASS**", "<img src=x onerror=alert(1)>", "<img src=y onerror=alert(4)>",
                  "[ok](javascript:alert(5))", "$\\color{green}PASS$", "&lt;b&gt;", "\\<img src=z onerror=alert(6)>",
                  "c|d_", "<script>alert(8)</script>", "\\u202eevil", "\\x1b[2J", "fail\\x0a# PASS"):
        assert shown in text, shown
    tokens = MarkdownIt("commonmark").enable("table").parse(md)
    widths: list[int] = []
    for tok in tokens:  # every table row has as many cells as its header: no cell was injected
        if tok.type == "tr_open":
            widths.append(0)
        elif tok.type in ("th_open", "td_open"):
            widths[-1] += 1
        elif tok.type == "table_close":
            assert len(set(widths)) == 1, widths
            widths = []


def test_html_report_escapes_markup_bidi_and_esc(tmp_path):
    out = tmp_path / "r.html"
    code, _ = run("report", str(_injected_result(tmp_path)), "-o", str(out))
    assert code == 0
    page = out.read_text(encoding="utf-8")
    assert BIDI not in page and ESC not in page
    parsed = _tags(page)
    assert not {"img", "script", "a", "b"} & set(parsed.tags), set(parsed.tags)
    text = "".join(parsed.text)
    for shown in ("<img src=x onerror=alert(1)>", "<script>alert(3)</script>", "\\u202eevil", "\\x1b[2J",
                  "\\x1b[31m<b>"):
        assert shown in text, shown


def test_junit_is_well_formed_with_control_and_bidi_characters(tmp_path):
    nasty = "t\x00\x01\x08\x0b\x0c\x1b[31m\x7f\u202e\ud800\ufffe.0.x"
    path = write_result(tmp_path, result([tap_entry(0, "ok.0.a"), tap_entry(1, nasty.replace("\ud800", ""),
                                                                             passed=False, stack="s\x0c",
                                                                             reason="r\x00\x1b]0;title\x07")]))
    out = tmp_path / "r.xml"
    code, text = run("report", str(path), "-f", "junit", "-o", str(out))
    assert code == 0, text
    root = ET.parse(out).getroot()  # well-formed XML
    names = [c.get("name") for c in root.iter("testcase")]
    assert "t\\x00\\x01\\x08\\x0b\\x0c\\x1b[31m\\x7f\\u202e\\ufffe.0.x" in names
    raw = out.read_text(encoding="utf-8")
    assert not any(ch in raw for ch in "\x00\x01\x08\x0b\x0c\x1b\x7f\u202e\ufffe")
    # a report built in Python (no JSON in between) may hold a lone surrogate: still well-formed
    report = Report([TapResult(TapInfo(nasty, "s", 0, "x"), 0, "fail", "why\ud800", 0.999)])
    ET.fromstring(render_junit(report))
    for rendered in (render_html(report), render_markdown(report)):
        rendered.encode("utf-8")  # writable: no surrogate survives


# --------------------------------------------------------------------------- 5. special output files


def _report_args(tmp_path: Path, out: Path) -> list[str]:
    return ["report", str(write_result(tmp_path, result())), "-f", "md", "-o", str(out)]


def test_report_through_a_symlink_to_dev_null_writes_through(tmp_path):
    link = tmp_path / "out.md"
    link.symlink_to("/dev/null")
    code, out = run(*_report_args(tmp_path, link))
    assert code == 0, out
    assert link.is_symlink() and os.readlink(link) == "/dev/null"
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    code, out = run("report", str(write_result(tmp_path, result())), "-f", "model-explorer", "-o", str(link))
    assert code == 0 and out.splitlines() == [f"wrote {link}"], out  # no tap graph made next to /dev/null
    # a symlink to a regular file keeps the link; its target gets the report
    target = tmp_path / "real.md"
    target.write_text("old")
    link2 = tmp_path / "link2.md"
    link2.symlink_to(target)
    assert run(*_report_args(tmp_path, link2))[0] == 0
    assert link2.is_symlink() and target.read_text().startswith("### ")


def _char_device(tmp_path: Path) -> Path:
    """A twin of /dev/null in tmp_path (needs CAP_MKNOD)."""
    dev = tmp_path / "null"
    try:
        os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot make a device node here: {exc}")
    return dev


def test_report_and_json_to_a_character_device_write_through(tmp_path):
    dev = _char_device(tmp_path)
    code, out = run(*_report_args(tmp_path, dev))
    assert code == 0, out
    assert stat.S_ISCHR(os.stat(dev).st_mode) and not (tmp_path / "null.partial").exists()
    a, b = _tiny_dump(tmp_path / "a.h5"), _tiny_dump(tmp_path / "b.h5")
    code, out = run("diff", str(a), str(b), "--json", str(dev))
    assert code == 0, out
    assert stat.S_ISCHR(os.stat(dev).st_mode)


def test_report_to_a_fifo_writes_through(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader is there: the writer's open does not wait
    try:
        code, out = run(*_report_args(tmp_path, fifo))
        assert code == 0, out
        assert stat.S_ISFIFO(os.stat(fifo).st_mode), "the FIFO was replaced by a file"
        got = b""
        while chunk := os.read(reader, 1 << 16):
            got += chunk
    except BlockingIOError:
        got = b""
    finally:
        os.close(reader)
    assert got.decode().startswith("### ")


def test_a_dump_to_a_special_file_is_refused_and_the_file_kept(tmp_path):
    """A dump is renamed over its path: a device, a FIFO or a symlink to one is refused."""
    pytest.importorskip("torch")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "link.h5"
    link.symlink_to("/dev/null")
    targets = [fifo, link]
    with_dev = True
    try:
        targets.append(_char_device(tmp_path))
    except pytest.skip.Exception:
        with_dev = False
    for target in targets:
        for extra in ([], ["--stats"]):
            code, out = run("capture", "--backend", "toy_backends:slow", "-o", str(target), *extra)
            assert code == 2 and "a dump is written to a regular file" in one_error_line(out), out
            assert target.is_symlink() if target == link else not target.is_symlink()
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and os.readlink(link) == "/dev/null"
    assert not with_dev or stat.S_ISCHR(os.stat(tmp_path / "null").st_mode)
    assert not list(tmp_path.glob("*.partial"))


def test_an_empty_output_path_is_one_line_exit_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = write_result(tmp_path, result())
    for fmt in ("html", "model-explorer"):
        code, out = run("report", str(r), "-f", fmt, "-o", "")
        assert code == 2 and "is a directory" in one_error_line(out)
    a, b = _tiny_dump(tmp_path / "a.h5"), _tiny_dump(tmp_path / "b.h5")
    code, out = run("diff", str(a), str(b), "--json", "")
    assert code == 2 and "is a directory" in out.splitlines()[-1]


# --------------------------------------------------------------------------- 12. big results, linear time


def test_a_report_with_many_layers_renders_in_linear_time():
    """60,000 layers of one stack: each table cell is looked up, not searched for (the
    search made a 200,000-tap result take minutes)."""
    rows = [TapResult(TapInfo(f"s.{i}.c", "s", i, "c"), i, "pass", "", 0.999) for i in range(60_000)]
    report = Report(rows)
    for render in (render_markdown, render_html):
        start = time.process_time()
        text = render(report)
        spent = time.process_time() - start
        assert "59999" in text and spent < 20, f"{render.__name__}: {spent:.1f} s of CPU"


# --------------------------------------------------------------------------- 13. malformed results

BAD_TAP_FIELDS = [
    ("regions", [1]), ("regions", "x"), ("regions", {"text": 5}), ("regions", {"text": {"cos": "x"}}),
    ("heads", {"h": 1}), ("heads", [5]), ("heads", [{"cos": []}]), ("chunks", [1]), ("chunks", {"0:4": "x"}),
    ("name", 5), ("name", None), ("name", ["a"]), ("status", 5), ("status", None), ("status", {"a": 1}),
    ("layer", "x"), ("layer", 1.5), ("layer", True), ("layer", 10 ** 30), ("stack", 5), ("stack", None),
    ("component", []), ("step", "1"), ("order", {}), ("threshold", "x"), ("threshold", None), ("reason", 5),
    ("cos", "x"), ("cos", 10 ** 400), ("n", 1.5), ("ref_shape", 5), ("ref_shape", ["a"]), ("ref_dtype", 5),
]
BAD_TOP_FIELDS = [
    ("candidate_error", "x"), ("candidate_error", [1]), ("candidate_error", {"tap": 5}),
    ("candidate_error", {"message": []}), ("isolation", "x"), ("isolation", [1]), ("isolation", {"steps": 5}),
    ("isolation", {"start": 5}), ("isolation", {"start": "a", "steps": [5]}),
    ("isolation", {"start": "a", "steps": [{"outputs": [{"cos": "x"}]}]}), ("problems", "abc"), ("problems", 5),
    ("problems", [5]), ("ref", "x"), ("ref", [1]), ("ref", 5), ("thresholds", "x"), ("thresholds", [1]),
    ("thresholds", {"min_cos": "x"}), ("ref", {"modules": 5}), ("ref", {"modules": "x"}),
    ("ref", {"modules": {"dec.0.mlp": 5}}), ("cand", {"config": [[[[[[[[1]]]]]]]] * 1}),
]


@pytest.mark.parametrize(("key", "value"), BAD_TAP_FIELDS, ids=[f"taps.{k}={v!r}"[:50] for k, v in BAD_TAP_FIELDS])
def test_a_tap_field_of_the_wrong_type_is_one_line_exit_2(tmp_path, key, value):
    d = result()
    d["taps"][2][key] = value
    path = write_result(tmp_path, d)
    for fmt in ("html", "md", "junit", "model-explorer"):
        code, out = run("report", str(path), "-f", fmt, "-o", str(tmp_path / f"out.{fmt}"))
        assert code == 2, out
        assert f"taps[2].{key}" in one_error_line(out)


@pytest.mark.parametrize(("key", "value"), BAD_TOP_FIELDS[:-1], ids=[f"{k}={v!r}"[:50] for k, v in BAD_TOP_FIELDS[:-1]])
def test_a_result_field_of_the_wrong_type_is_one_line_exit_2(tmp_path, key, value):
    path = write_result(tmp_path, result(**{key: value}))
    for fmt in ("html", "md", "junit", "model-explorer"):
        code, out = run("report", str(path), "-f", fmt, "-o", str(tmp_path / f"out.{fmt}"))
        assert code == 2, out
        assert key in one_error_line(out)


def test_deep_and_surrogate_results_are_one_line_exit_2_in_a_real_process(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    base = json.dumps(result())
    cases = {
        "deep.json": (deep, "nested too deeply"),
        "deep_meta.json": (base[:-1] + ', "extra": ' + deep + "}", "nested too deeply"),
        "deep_but_parsable.json": (json.dumps(result(cand={"backend": "c", "x": json.loads("[" * 500 + "]" * 500)})),
                                   "nested deeper than"),
        "surrogate.json": (base.replace('"backend": "cand"', '"backend": "c\\ud800"'), "lone surrogate"),
        "surrogate_name.json": (base.replace('"name": "dec.0.mlp"', '"name": "dec.0.mlp\\udc80"'), "lone surrogate"),
    }
    for name, (text, words) in cases.items():
        path = write_result(tmp_path, text, name)
        proc = subprocess.run([sys.executable, "-m", "parity.cli", "report", str(path), "-f", "md", "-o",
                               str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (name, proc.stderr)
        assert "Traceback" not in proc.stderr and words in one_error_line(proc.stderr), (name, proc.stderr)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                  max_size=3), max_leaves=8)
_PATHS = [("taps", 2, k) for k in tap_entry(0)] + [("taps", 2, "regions", "text", k) for k in ("n", "cos", "rel_l2")] \
    + [(k,) for k in result()] + [("ref", "modules"), ("ref", "backend"), ("cand", "faults"), ("thresholds", "min_cos")]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(st.tuples(st.sampled_from(_PATHS), _json), min_size=1, max_size=3),
       fmt=st.sampled_from(["html", "md", "junit", "model-explorer"]))
def test_any_field_of_any_type_renders_or_is_one_line_exit_2(tmp_path, changes, fmt):
    d = copy.deepcopy(result())
    for path, value in changes:
        node = d
        for key in path[:-1]:
            if isinstance(node, dict):
                node = node.get(key)
            elif isinstance(node, list) and isinstance(key, int) and key < len(node):
                node = node[key]
            else:
                node = None
        if isinstance(node, dict):
            node[path[-1]] = value
    r = write_result(tmp_path, d)
    code, out = run("report", str(r), "-f", fmt, "-o", str(tmp_path / "out"))
    assert code == 0 or (code == 2 and one_error_line(out)), out
