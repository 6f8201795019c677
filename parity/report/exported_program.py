"""The FX graph of a `torch.export` archive (`.pt2`), read as plain JSON: no torch, and
nothing in the archive is unpickled or run.

`torch.export.load` rebuilds the whole program, and a weight or constant the archive marks
`use_pickle` is read with `torch.load(weights_only=False)`: loading a crafted `.pt2` runs
its code.  Model Explorer's node ids need none of that, only each FX node's name, the
nodes it reads and the modules it was recorded in, which the archive keeps as JSON
(`<root>/models/model.json`; `serialized_exported_program.json` in the older layout).  So
parity reads that one member with `zipfile` and `json` and never opens the weights,
constants or sample inputs.  Names follow torch's own deserializer: a node with one
output is named after it, each output of a node with several becomes its own node (FX's
`getitem`), recorded in the same modules."""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_GRAPH_BYTES = 1 << 30  # the graph's JSON, uncompressed: a large LLM's is tens of MB
MODEL_MEMBER = "models/model.json"  # under the archive's root folder (torch >= 2.8)
LEGACY_MEMBER = "serialized_exported_program.json"  # at the top (torch <= 2.7)
MAX_DEPTH = 64  # of one node argument (lists of optional tensors nest a few levels)

# Argument kinds that name a graph value (a node), and the key holding the name.
_VALUES = {"as_tensor": "name", "as_sym_int": "as_name", "as_sym_float": "as_name", "as_sym_bool": "as_name",
           "as_custom_obj": "name", "as_token": "name"}
# ... and kinds whose value is a list of them, each item that value itself ({"name": ...}).
_LISTS = {"as_tensors": "name", "as_sym_ints": "as_name", "as_sym_floats": "as_name", "as_sym_bools": "as_name"}
_KEYWORD = 2  # NamedArgument.kind: 1 positional, 2 keyword


@dataclass(frozen=True)
class GraphNode:
    """One FX node: its name, the nodes it reads (positional arguments first, as FX
    lists them), the module paths it was recorded in, and whether it is a graph input."""

    name: str
    inputs: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    placeholder: bool = False


def nodes_of_exported_program(ep) -> list[GraphNode]:
    """The nodes of an ExportedProgram already in memory (the caller loaded it)."""
    out = []
    for node in ep.graph_module.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        out.append(GraphNode(node.name, tuple(a.name for a in node.all_input_nodes),
                             tuple(normalise(path) for path, _type in stack.values()), node.op == "placeholder"))
    return out


def read_graph(path: str | Path) -> list[GraphNode]:
    """The top-level graph's nodes of the `.pt2` archive at `path`, in execution order;
    ValueError, in one line, if it is not an archive torch.export.save writes."""
    try:
        with zipfile.ZipFile(path) as archive:
            info = _graph_member(archive)
            if info.file_size > MAX_GRAPH_BYTES:
                raise ValueError(f"its graph ({info.filename}) is {info.file_size} bytes; parity reads at most "
                                 f"{MAX_GRAPH_BYTES}")
            with archive.open(info) as f:
                raw = f.read(MAX_GRAPH_BYTES + 1)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, RuntimeError) as exc:
        raise ValueError(f"not a readable .pt2 archive (a zip file): {exc}") from None
    if len(raw) > MAX_GRAPH_BYTES:
        raise ValueError(f"its graph is over {MAX_GRAPH_BYTES} bytes uncompressed")
    try:
        doc = json.loads(raw)
    except RecursionError:
        raise ValueError(f"its graph ({info.filename}) is JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"its graph ({info.filename}) is not JSON: {exc}") from None
    try:
        return _nodes(doc)
    except (KeyError, TypeError, AttributeError, IndexError) as exc:
        raise ValueError(f"its graph ({info.filename}) is not a torch.export graph: bad or missing {exc}") from None


def _graph_member(archive: zipfile.ZipFile) -> zipfile.ZipInfo:
    infos = archive.infolist()
    for info in infos:
        parts = info.filename.split("/")
        if len(parts) == 3 and "/".join(parts[1:]) == MODEL_MEMBER:
            return info
    for info in infos:
        if info.filename == LEGACY_MEMBER:
            return info
    others = sorted({i.filename.split("/")[-1] for i in infos if "/models/" in i.filename})
    extra = f" (it holds {', '.join(others[:5])})" if others else ""
    raise ValueError(f"no exported program in it: no <root>/{MODEL_MEMBER} or {LEGACY_MEMBER}{extra}")


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(what)
    return value


def _value_names(arg: Any) -> list[str]:
    """The graph values (nodes) an Argument refers to, in order; literals name none."""
    out: list[str] = []
    todo = [(arg, 0)]
    while todo:
        item, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise TypeError("argument (nested too deeply)")
        if isinstance(item, list):
            todo += [(x, depth + 1) for x in reversed(item)]
        elif isinstance(item, dict):
            for kind, value in reversed(list(item.items())):
                if kind in _VALUES and isinstance(value, dict):
                    out_name = value.get(_VALUES[kind])
                    if isinstance(out_name, str):
                        todo.append((_Name(out_name), depth))
                elif kind in _LISTS and isinstance(value, list):
                    todo += [(_Name(v[_LISTS[kind]]), depth) for v in reversed(value)
                             if isinstance(v, dict) and isinstance(v.get(_LISTS[kind]), str)]
                elif kind != "as_graph":  # a subgraph's own values are not this graph's nodes
                    todo.append((value, depth + 1))
        elif isinstance(item, _Name):
            out.append(str(item))
    return out


class _Name(str):
    """A value's name found in an Argument (a plain string there is a literal)."""


def _modules(metadata: dict) -> tuple[str, ...]:
    """`nn_module_stack` as serialized: `key,path,type` items joined by `;` (a type may
    hold commas inside brackets)."""
    text = metadata.get("nn_module_stack")
    if not text:
        return ()
    paths = []
    for item in _text(text, "metadata.nn_module_stack").split(";"):
        depth, fields, start = 0, [], 0
        for i, ch in enumerate(item):
            if ch in "[(":
                depth += 1
            elif ch in ")]":
                depth -= 1
            elif ch == "," and depth == 0:
                fields.append(item[start:i])
                start = i + 1
        fields.append(item[start:])
        if len(fields) != 3:
            raise TypeError("metadata.nn_module_stack")
        paths.append(normalise(fields[1]))
    return tuple(paths)


def _nodes(doc: Any) -> list[GraphNode]:
    graph = doc["graph_module"]["graph"]
    specs = (doc["graph_module"].get("signature") or {}).get("input_specs") or []
    out = []
    for i, arg in enumerate(graph["inputs"]):
        names = _value_names(arg) or [_constant_input_name(specs, i)]  # a literal input (use_cache=False)
        out += [GraphNode(name, placeholder=True) for name in names]
    for node in graph["nodes"]:
        target = _text(node["target"], "node target")
        inputs = sorted(node["inputs"], key=lambda a: a.get("kind") == _KEYWORD)
        reads = tuple(dict.fromkeys(name for a in inputs for name in _value_names(a["arg"])))
        modules = _modules(node.get("metadata") or {})
        outputs = node["outputs"]
        named = node.get("name")
        single = (len(outputs) == 1 and any(k in outputs[0] for k in _VALUES if k not in ("as_custom_obj", "as_token"))
                  and not ("torch.ops.higher_order" in target and node.get("is_hop_single_tensor_return") is False))
        if single:
            out.append(GraphNode(_value_names(outputs[0])[0], reads, modules))
            continue
        if named:
            out.append(GraphNode(_text(named, "node name"), reads, modules))
        parent = (named,) if named else ()
        out += [GraphNode(name, parent, modules) for name in _value_names(outputs)]
    return out


def _constant_input_name(specs: list, i: int) -> str:
    """A literal graph input's placeholder name: its input spec's, as torch names it."""
    spec = specs[i] if i < len(specs) and isinstance(specs[i], dict) else {}
    inner = next(iter(spec.values()), {}) if spec else {}
    name = inner.get("name") if isinstance(inner, dict) else None
    if not isinstance(name, str) and isinstance(inner, dict) and isinstance(inner.get("arg"), dict):
        name = inner["arg"].get("name")
    return name if isinstance(name, str) and name else f"arg{i}"


def normalise(path: str) -> str:
    """FX module paths come as `model.layers.0` or, from older torch, `L['self'].model.layers.0`."""
    for prefix in ("L['self'].", "L__self___"):
        if path.startswith(prefix):
            path = path[len(prefix):]
    return path
