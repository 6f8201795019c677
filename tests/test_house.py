"""The house rules, checked from the import graph of the source (nothing is imported).

- no import circles, in the package or in the bundled probes;
- the core never imports the bundled probes (architectures plug in through the registry);
- `parity.dump` imports neither capture nor compare: a dump is read without them;
- `parity.comparison` imports no renderer: results render themselves elsewhere;
- only the capture side, the device comparers, isolation and the backend registry import
  torch when they are loaded (the offline diff never needs it);
- the installed package list names every package folder, and the probes are installed
  under `parity.probes`, never as a top-level `probes`.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RENDERERS = ("parity.report.terminal", "parity.report.html", "parity.report.markdown", "parity.report.junit",
             "parity.report.model_explorer", "parity.report.svg", "parity.report.progress", "parity.report.text")
TORCH_AT_LOAD = ("parity.capture", "parity.comparison.device_sums", "parity.comparison.on_device",
                 "parity.comparison.isolate",
                 "parity.taps.backends")


def _modules() -> dict[str, Path]:
    """Import name -> file, for the package and the bundled probes (installed as parity.probes)."""
    out = {}
    for base, prefix in ((ROOT / "parity", "parity"), (ROOT / "probes", "parity.probes")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([prefix, *parts])] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module load?) for every import in the file; `from a import b`
    counts as importing `a.b` when that is a module."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = {id(n) for n in tree.body}
    guarded = set()
    for n in tree.body:
        if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
            guarded |= {id(m) for m in ast.walk(n)}
    out = []
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        at_load = id(node) in top
        if isinstance(node, ast.Import):
            out += [(a.name, at_load) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            out.append((base, at_load))
            out += [(f"{base}.{a.name}", at_load) for a in node.names if f"{base}.{a.name}" in MODULES]
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _within(name: str, prefixes: tuple[str, ...] | str) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _edges(at_load_only: bool = False):
    for name, imports in GRAPH.items():
        for target, at_load in imports:
            if target in MODULES and target != name and (at_load or not at_load_only):
                yield name, target


def test_the_graph_is_read():
    """Guards the guards: the rules below are vacuous if the graph comes back empty."""
    assert len(MODULES) > 40
    assert ("parity.comparison.loop", "parity.comparison.rules") in set(_edges())
    assert any(t == "torch" for t, _ in GRAPH["parity.capture.recorder"])


def test_no_import_circles():
    graph: dict[str, set[str]] = {}
    for a, b in _edges():
        graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            # a package's __init__ is a face: importing a.b runs a/__init__ first, which is no loop
            if state.get(nxt) == 1 and not _within(node, nxt):
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("rule", [
    ("the core imports no bundled probe", "parity", "parity.probes"),
    ("a dump is read without capture", "parity.dump", "parity.capture"),
    ("a dump is read without compare", "parity.dump", "parity.comparison"),
    ("compare imports no renderer", "parity.comparison", RENDERERS),
    ("records know nothing above them", "parity.taps", ("parity.capture", "parity.comparison", "parity.dump",
                                                        "parity.report", "parity.api", "parity.cli")),
], ids=lambda r: r[0])
def test_house_rule(rule):
    _, source, forbidden = rule
    broken = [f"{a} -> {t}" for a, imports in GRAPH.items() if _within(a, source) and not _within(a, "parity.probes")
              for t, _ in imports if _within(t, forbidden)]
    assert not broken, broken


def test_only_the_device_side_imports_torch_at_load():
    loaders = sorted(a for a, imports in GRAPH.items() if not _within(a, "parity.probes")
                     for t, at_load in imports if at_load and _within(t, "torch"))
    assert loaders, "no module imports torch at load: the graph is not read"
    assert [a for a in loaders if not _within(a, TORCH_AT_LOAD)] == []


def test_every_package_folder_is_installed_and_probes_are_namespaced():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = set(config["packages"])
    folders = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    assert packages == folders
    assert not any(p == "probes" or p.startswith("probes.") for p in packages)
    assert config["package-dir"] == {"parity.probes": "probes"}
    entry_points = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["parity.backends"]
    assert all(v.startswith("parity.probes.") for v in entry_points.values())


def test_parity_holds_at_most_eight_modules_beside_its_role_folders():
    files = sorted(p.name for p in (ROOT / "parity").glob("*.py"))
    assert len(files) <= 8, files
    assert {p.name for p in (ROOT / "parity").iterdir() if p.is_dir() and (p / "__init__.py").exists()} == {
        "taps", "capture", "dump", "comparison", "report"}
