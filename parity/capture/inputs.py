"""Keeping what modules receive, so that each one can be re-run on its own afterwards.

A pre-forward hook on each named module keeps every call's positional and keyword
arguments exactly as the module got them.  Nothing is copied: a kept tensor is the
model's own, held past the point where the model would have freed it.  That is the
cost, and `InputBudget` bounds it: the bytes of every distinct tensor storage the kept
arguments reference (a storage several calls share, like an attention mask, or a layer's
input that is also its first norm's input, counts once), at most `max_bytes`.  The first
call that would go past the bound, and every call after it, is not kept but marked
(`NotKept`, saying where the bound was reached), so whoever re-runs it can say why it
cannot.  Tensors inside other objects (a KV cache object) are held but not counted.

Each kept tensor's version counter is noted: an input changed in place after the call
is detected (`KeptCall.changed`) instead of being re-run as if the module had seen it.
The hooks exist only while the recorder is installed; under torch.compile they are not
traced (a graph break per kept call, like the tap hooks).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from parity.capture.observation import INPUT_HOOK, opaque

MB = 1 << 20


@dataclass(frozen=True)
class KeptCall:
    """One module call's arguments, held by reference, with each tensor's version then."""

    module: torch.nn.Module
    args: tuple
    kwargs: dict
    versions: tuple[tuple[torch.Tensor, int], ...]
    state: tuple = ()  # the tensors held by stateful objects it received, as they were (`object_state`)

    def changed(self) -> str | None:
        """How what it received changed after the call (None: it did not): a kept tensor
        modified in place, or an object (a KV cache) holding other tensors than then."""
        if any(t._version != v for t, v in self.versions):
            return "an input it received was changed in place after the call"
        if object_state((self.args, self.kwargs)) != self.state:
            return (f"an object it received ({self._holder()}) holds other tensors than at the call (a cache a "
                    "later call wrote to)")
        return None

    def _holder(self) -> str:
        objs = [v for v in (*self.args, *self.kwargs.values()) if object_state(v)]
        return type(objs[0]).__name__ if objs else "an object"


def object_state(value: Any, depth: int = 3) -> tuple:
    """What the stateful objects in an argument hold: (id, version) of each tensor reachable
    through their attributes (and lists of objects, as a cache keeps its layers), in order.
    A call that read such an object cannot be re-run as it ran once the object has moved on
    (a decode step appended to the cache its attention read)."""
    out: list = []

    def visit(v: Any, level: int, inside: bool) -> None:
        if isinstance(v, torch.Tensor):
            if inside:
                out.append((id(v), _version(v)))
        elif isinstance(v, (tuple, list)):
            for x in v:
                visit(x, level, inside)
        elif isinstance(v, dict):
            for x in v.values():
                visit(x, level, inside)
        elif level > 0 and not isinstance(v, (torch.nn.Module, type, str, bytes, int, float, bool)) \
                and hasattr(v, "__dict__"):
            for x in vars(v).values():
                visit(x, level - 1, True)

    visit(value, depth, False)
    return tuple(out)


@dataclass(frozen=True)
class NotKept:
    """A call whose arguments were not kept (the budget was spent), and why."""

    reason: str


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in an argument: itself, or inside tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from tensors_in(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors_in(v)


def _storage(t: torch.Tensor) -> tuple[Any, int]:
    """(identity, bytes) of the memory a tensor keeps alive."""
    try:
        s = t.untyped_storage()
        return (t.device, s.data_ptr()), s.nbytes()
    except (RuntimeError, NotImplementedError):  # no plain storage (a tensor subclass): the tensor itself
        return ("tensor", id(t)), t.numel() * t.element_size()


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference-mode tensor has no version counter (and cannot be changed in place)
        return None


class InputBudget:
    """The kept calls of one run, and the bytes they hold, up to `max_bytes` (None: no bound)."""

    def __init__(self, max_bytes: int | None):
        if max_bytes is not None and max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self.used = 0  # bytes of the distinct storages held
        self.calls = 0  # calls kept
        self.full: str | None = None  # why nothing more is kept, once the bound is reached
        self._seen: set = set()

    def keep(self, module: torch.nn.Module, args: tuple, kwargs: dict, where: str) -> KeptCall | NotKept:
        if self.full is not None:
            return NotKept(self.full)
        tensors = list(tensors_in((args, kwargs)))
        new: dict = {}
        for t in tensors:
            key, size = _storage(t)
            if key not in self._seen:
                new[key] = size
        added = sum(new.values())
        if self.max_bytes is not None and self.used + added > self.max_bytes:
            self.full = (f"the module inputs kept for isolation reached their cap of {self.max_bytes / MB:g} MB "
                         f"at {where}, after {self.calls} calls")
            return NotKept(self.full)
        self._seen.update(new)
        self.used += added
        self.calls += 1
        versions = tuple((t, v) for t in tensors if (v := _version(t)) is not None)
        return KeptCall(module, tuple(args), dict(kwargs), versions, object_state((args, kwargs)))


OnCall = Callable[[str, torch.nn.Module, tuple, dict], None]


def _pre(on_call: OnCall, name: str, module, args, kwargs):
    on_call(name, module, args, kwargs)


# Under torch.compile the hook runs as plain Python, untraced (see parity.capture.recorder).
_pre_opaque = opaque(_pre, INPUT_HOOK)


def _hook(on_call: OnCall, name: str, module, args, kwargs):
    if torch.compiler.is_compiling():
        return _pre_opaque(on_call, name, module, args, kwargs)
    return _pre(on_call, name, module, args, kwargs)


def install_input_hooks(model: torch.nn.Module, names: set[str], on_call: OnCall) -> list:
    """One pre-forward hook (with kwargs) on each module of `model` named in `names`,
    calling `on_call(name, module, args, kwargs)`; returns the handles (remove them all
    when done).  Nothing is left installed if installing fails half-way."""
    handles: list = []
    try:
        for name, module in model.named_modules():
            if name in names:
                handles.append(module.register_forward_pre_hook(functools.partial(_hook, on_call, name),
                                                                with_kwargs=True))
    except BaseException:
        for h in handles:
            h.remove()
        raise
    return handles


class CannotRerun(Exception):
    """A kept call cannot be re-run as it ran (an input changed in place, nothing to replace)."""


def _data_parameter(module: torch.nn.Module) -> str | None:
    """The name of the forward's first parameter, when it can be passed by keyword."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    first = next(iter(params), None)
    if first is None or first.kind not in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD):
        return None
    return first.name


def data_input(call: KeptCall) -> Any:
    """The call's data input: the forward's first argument, as the module got it."""
    if call.args:
        return call.args[0]
    name = _data_parameter(call.module)
    if name is None or name not in call.kwargs:
        raise CannotRerun(f"{type(call.module).__name__} received no positional input")
    return call.kwargs[name]


def rerun(call: KeptCall, data: Any = None, catch: str | None = None) -> Any:
    """Call the module again on its kept arguments (`data`, if given, in place of its data
    input; every other argument as it was), without autograd.  Returns its output, or with
    `catch` (a sub-module's path inside it) the first positional input that sub-module
    receives during the call.  The sub-module's hook is removed in `finally`."""
    why = call.changed()
    if why:
        raise CannotRerun(why)
    args, kwargs = call.args, call.kwargs
    if data is not None:
        if args:
            args = (data, *args[1:])
        else:
            data_input(call)  # raises when there is none to replace
            kwargs = {**kwargs, _data_parameter(call.module): data}
    caught: list = []
    handle = None
    if catch is not None:
        try:
            sub = call.module.get_submodule(catch)
        except AttributeError as exc:
            raise CannotRerun(f"it has no sub-module {catch}") from exc
        handle = sub.register_forward_pre_hook(lambda module, a: caught.append(a[0] if a else None))
    try:
        with torch.no_grad():
            out = call.module(*args, **kwargs)
    finally:
        if handle is not None:
            handle.remove()
    if catch is None:
        return out
    if not caught:
        raise RuntimeError(f"its sub-module {catch} did not run")
    return caught[0]
