"""Errors overlaid on a model graph in Google's Model Explorer.

Model Explorer colours graph nodes from a "node data" JSON file
(`{"results": {node_id: {"value": v, "bgColor": c}}, "thresholds": [...]}`).  Which
node ids exist depends on how the graph was loaded:

* a PyTorch ExportedProgram (`.pt2`): node ids are FX node names (`linear_13`).
  `node_ids_from_graph(read_graph("model.pt2"), report.ref_meta["modules"])` (CLI:
  `--exported-program model.pt2`) maps each tap's module to the FX node that produces
  its value, reading the archive's graph as JSON, never unpickling it
  (parity.report.exported_program); `node_ids_from_exported_program(ep, ...)` does the
  same for a program already loaded;
* otherwise parity writes its own graph (`tap_graph`): one node per tap, namespaced
  `stack/layer_N`, chained in execution order, which Model Explorer's JSON adapter
  loads; its node ids are the tap names.  The file holds one graph collection object
  (`{"label", "graphs"}`): the JSON adapter of ai-edge-model-explorer 0.1.34 refuses a
  list of collections ("Unsupported JSON format"); tests/report/test_model_explorer_real.py
  opens both files in the real tool.

Value = cosine similarity (worst step); colour = the verdict (green pass, red fail,
orange anything else), so the per-tap thresholds are honoured exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from parity.comparison.rules import DEFAULT_MIN_COS
from parity.report.exported_program import GraphNode, nodes_of_exported_program
from parity.report.results import Report, TapResult
from parity.report.series import worst

PASS_COLOR, FAIL_COLOR, OTHER_COLOR = "#b7e4c7", "#f4a3a3", "#fcd5a5"


def _by_name(report: Report) -> dict[str, TapResult]:
    groups: dict[str, list[TapResult]] = {}
    for r in report.rows:
        groups.setdefault(r.info.name, []).append(r)
    return {name: worst(rows) for name, rows in groups.items()}


def _color(row: TapResult) -> str:
    return PASS_COLOR if row.passed else FAIL_COLOR if row.status == "fail" else OTHER_COLOR


def node_data(report: Report, node_ids: Mapping[str, str] | None = None) -> dict:
    """GraphNodeData JSON; `node_ids` maps tap names to graph node ids (default: the tap
    names themselves, the ids of `tap_graph`).  Taps with no node are left out."""
    results = {}
    for name, row in _by_name(report).items():
        node = name if node_ids is None else node_ids.get(name)
        if node is None:
            continue
        cos = row.cos
        value = cos if cos is not None and math.isfinite(cos) else -1.0
        results[node] = {"value": round(value, 9), "bgColor": _color(row)}
    min_cos = float(report.thresholds.get("min_cos", DEFAULT_MIN_COS))
    return {"results": results,
            "thresholds": [{"value": min_cos - 1e-12, "bgColor": FAIL_COLOR}, {"value": 1.0, "bgColor": PASS_COLOR}]}


def tap_graph(report: Report, label: str = "parity taps") -> dict:
    """A Model Explorer graph collection of the taps themselves (`{"label", "graphs"}`,
    the one JSON object Model Explorer's JSON adapter loads as a collection): nodes in
    execution order, grouped by stack and layer, each fed by the previous tap of its stack."""
    nodes = []
    last_in_stack: dict[str, str] = {}
    for name, row in _by_name(report).items():
        i = row.info
        namespace = i.stack + (f"/layer_{i.layer}" if i.layer is not None else "")
        m = row.metrics
        attrs = [{"key": "status", "value": row.status}, {"key": "reason", "value": row.reason},
                 {"key": "cos", "value": "" if m is None else f"{m.cos:.6f}"},
                 {"key": "max_abs", "value": "" if m is None else f"{m.max_abs:.4g}"},
                 {"key": "rel_l2", "value": "" if m is None else f"{m.rel_l2:.4g}"},
                 {"key": "module", "value": str(report.ref_meta.get("modules", {}).get(name, ""))}]
        edges = [{"sourceNodeId": last_in_stack[i.stack], "sourceNodeOutputId": "0", "targetNodeInputId": "0"}] \
            if i.stack in last_in_stack else []
        nodes.append({"id": name, "label": i.component, "namespace": namespace, "attrs": attrs,
                      "incomingEdges": edges, "outputsMetadata": [], "inputsMetadata": [], "subgraphIds": []})
        last_in_stack[i.stack] = name
    return {"label": label, "graphs": [{"id": "parity", "nodes": nodes}]}


def node_ids_from_exported_program(ep, modules: Mapping[str, str]) -> dict[str, str]:
    """Tap name -> FX node name of a torch.export ExportedProgram already in memory."""
    return node_ids_from_graph(nodes_of_exported_program(ep), modules)


def node_ids_from_graph(nodes: list[GraphNode], modules: Mapping[str, str]) -> dict[str, str]:
    """Tap name -> FX node name, for the nodes of an exported program in execution order.

    `modules` maps tap names to qualified module names (a report's `ref.modules`;
    `name:input` for input taps).  A module's value is the last FX node recorded inside
    that module; a module's input is the first non-placeholder argument of its first
    node.  Split taps (q/k/v of a fused projection) share their projection's node."""
    placeholders = {n.name for n in nodes if n.placeholder}
    inside: dict[str, list[GraphNode]] = {}
    for node in nodes:
        for path in node.modules:
            inside.setdefault(path, []).append(node)
    out: dict[str, str] = {}
    for tap, module in modules.items():
        path, _, side = module.partition(":")
        found = inside.get(path)
        if not found:
            continue
        if side == "input":
            names = {n.name for n in found}
            args = [a for a in found[0].inputs if a not in placeholders and a not in names]
            if args:
                out[tap] = args[0]
        else:
            out[tap] = found[-1].name
    return out
