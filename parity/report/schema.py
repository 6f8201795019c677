"""What a tensor diff result (`parity diff --json`) must look like before it is read back.

A result file may come from anywhere (a CI artefact, a ticket), so every field a reader
uses is checked for the type parity writes before any of it is used: a wrong type is a
ValueError naming the field (`taps[3].layer: a string, expected an integer or null`),
never a crash three modules later.  Free-form parts (the runs' metadata, the thresholds,
the isolation record) are checked for depth, and every text for lone surrogates (which no
file can be written with).  Keys parity does not read are left alone."""

from __future__ import annotations

import re
from typing import Any

MAX_DEPTH = 64  # parity's own results nest about 6 deep; a renderer recurses into what is shown
MAX_INT = 1 << 63  # integers parity writes fit in int64

_SURROGATE = re.compile("[\ud800-\udfff]")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object" if isinstance(value, dict) else type(value).__name__


def _is_int(v: Any) -> bool:
    return type(v) is int and -MAX_INT <= v < MAX_INT


def _is_number(v: Any) -> bool:
    return type(v) is float or _is_int(v)


def _is_text(v: Any) -> bool:
    return type(v) is str and (v.isascii() or _SURROGATE.search(v) is None)


# kind -> (test, the exact types it allows, words for the message)
_KINDS = {
    "text": (_is_text, {str}, "a string"),
    "int": (_is_int, {int}, "an integer"),
    "number": (_is_number, {int, float}, "a number"),
    "list": (lambda v: type(v) is list, {list}, "a list"),
    "object": (lambda v: type(v) is dict, {dict}, "an object"),
}


def _found(value: Any, kind: str) -> str:
    if kind in ("int", "number") and type(value) is int:
        return "an integer out of range"
    return _kind(value)


def _check(where: str, value: Any, kind: str, nullable: bool = True) -> Any:
    """`value`, if it is of `kind` (or null, when `nullable`); else ValueError naming `where`."""
    if value is None and nullable:
        return value
    test, _types, words = _KINDS[kind]
    if test(value):
        return value
    if kind == "text" and isinstance(value, str):
        raise ValueError(f"{where}: a string with a lone surrogate (not valid Unicode)")
    raise ValueError(f"{where}: {_found(value, kind)}, expected {words}{' or null' if nullable else ''}")


def _spec(*fields: tuple[str, str, bool]) -> tuple[tuple[str, str, bool, frozenset], ...]:
    """Fields as (key, kind, nullable, the types that need no closer look)."""
    return tuple((key, kind, nullable, frozenset(_KINDS[kind][1] | ({type(None)} if nullable else set())))
                 for key, kind, nullable in fields)


def _fields(where: str, d: dict, spec) -> None:
    # The fast path sees each value's type once (a result may hold 200,000 taps); only
    # ints (range), non-ASCII strings (surrogates) and misfits get the closer look.
    for key, kind, nullable, types in spec:
        v = d.get(key)
        t = type(v)
        if t not in types or (t is int and not -MAX_INT <= v < MAX_INT) or (t is str and not v.isascii()):
            _check(f"{where}.{key}", v, kind, nullable)


_METRICS = _spec(*((k, "number", True) for k in ("cos", "max_abs", "mean_abs", "rel_l2", "norm_ratio")),
                 *((k, "int", True) for k in ("n", "nan_ref", "nan_cand", "inf_ref", "inf_cand")))
_TAP = _spec(("name", "text", False), ("stack", "text", False), ("component", "text", False), ("layer", "int", True),
             ("step", "int", True), ("order", "int", True), ("status", "text", False), ("reason", "text", True),
             ("threshold", "number", False), ("max_norm_err", "number", True), ("ref_dtype", "text", True),
             ("cand_dtype", "text", True), ("ref_shape", "list", True), ("cand_shape", "list", True),
             ("regions", "object", True), ("chunks", "object", True), ("heads", "list", True)) + _METRICS
_REQUIRED = ("name", "stack", "component", "layer", "status", "threshold")
_OUTPUT = _spec(("status", "text", True), ("component", "text", True), ("cos", "number", True),
                ("threshold", "number", True), ("reason", "text", True))
_ERROR = _spec(("tap", "text", True), ("type", "text", True), ("message", "text", True))
_ISOLATION = _spec(*((k, "text", True) for k in ("start", "introduced", "hint", "narrowed", "note")),
                   ("steps", "list", True))


def _metrics(where: str, d: Any) -> None:
    _check(where, d, "object", nullable=False)
    _fields(where, d, _METRICS)


def _tap(where: str, d: Any) -> None:
    _check(where, d, "object", nullable=False)
    for key in _REQUIRED:
        if key not in d:
            raise ValueError(f"{where}: no {key!r}")
    _fields(where, d, _TAP)
    for key in ("ref_shape", "cand_shape"):
        for i, size in enumerate(d.get(key) or ()):
            if type(size) is not int:
                _check(f"{where}.{key}[{i}]", size, "int", nullable=False)
    for key in ("regions", "chunks"):
        for name, m in (d.get(key) or {}).items():
            if not name.isascii():
                _check(f"{where}.{key} name", name, "text", nullable=False)
            _metrics(f"{where}.{key}[{name!r}]", m)
    for i, m in enumerate(d.get("heads") or ()):
        _metrics(f"{where}.heads[{i}]", m)


def _free(where: str, value: Any) -> None:
    """Any JSON, but no deeper than MAX_DEPTH and no text with a lone surrogate."""
    stack = [(where, value, 1)]
    while stack:
        at, v, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"{at}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(v, str):
            _check(at, v, "text")
        elif isinstance(v, dict):
            stack += [(f"{at}[{k!r}]", k, depth) for k in v]
            stack += [(f"{at}[{k!r}]", x, depth + 1) for k, x in v.items()]
        elif isinstance(v, list):
            stack += [(f"{at}[{i}]", x, depth + 1) for i, x in enumerate(v)]


def check_report(d: dict) -> None:
    """ValueError, in one line naming the field, unless every field of the tensor diff
    result `d` that a reader uses has the type parity writes."""
    try:
        for i, t in enumerate(_check("taps", d.get("taps"), "list", nullable=False)):
            _tap(f"taps[{i}]", t)
    except ValueError as exc:
        raise ValueError(f"malformed tap entry in the parity result: {exc}") from None
    try:
        _check_report(d)
    except ValueError as exc:
        raise ValueError(f"malformed tensor diff result: {exc}") from None


def _check_report(d: dict) -> None:
    for i, p in enumerate(_check("problems", d.get("problems"), "list") or ()):
        _check(f"problems[{i}]", p, "text", nullable=False)
    for side in ("ref", "cand"):
        meta = _check(side, d.get(side), "object") or {}
        modules = _check(f"{side}.modules", meta.get("modules"), "object") or {}
        for tap, module in modules.items():
            if type(module) is not str or not module.isascii():
                _check(f"{side}.modules[{tap!r}]", module, "text", nullable=False)
        _free(side, {k: v for k, v in meta.items() if k != "modules"})
    thresholds = _check("thresholds", d.get("thresholds"), "object") or {}
    _check("thresholds.min_cos", thresholds.get("min_cos"), "number")
    _free("thresholds", thresholds)
    err = _check("candidate_error", d.get("candidate_error"), "object")
    if err:
        _fields("candidate_error", err, _ERROR)
    iso = _check("isolation", d.get("isolation"), "object")
    if iso:
        _fields("isolation", iso, _ISOLATION)
        for i, step in enumerate(iso.get("steps") or ()):
            _check(f"isolation.steps[{i}]", step, "object", nullable=False)
            _check(f"isolation.steps[{i}].error", step.get("error"), "text")
            for j, out in enumerate(_check(f"isolation.steps[{i}].outputs", step.get("outputs"), "list") or ()):
                _check(f"isolation.steps[{i}].outputs[{j}]", out, "object", nullable=False)
                _fields(f"isolation.steps[{i}].outputs[{j}]", out, _OUTPUT)
        _free("isolation", iso)
