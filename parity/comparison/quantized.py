"""Quantised weights as the values a model computes with, found generically.

`parity weights` on a backend without `Backend.parameters` compares its model's own
parameters.  A quantised model does not hold its weights as plain tensors, so this
module looks at each module and parameter (never at names) and dequantises through the
quantisation library's own API:

- a tensor subclass with its own `dequantize()` (torchao's `Int8Tensor`, `Float8Tensor`,
  `IntxUnpackedToInt8Tensor`...; optimum-quanto's frozen `QTensor`s);
- a torch.ao quantised module whose `weight` is a method over packed parameters
  (`quantize_dynamic`'s `DynamicQuantizedLinear`, static quantised Linear and Conv): its
  weight and bias are not parameters at all, so `named_parameters()` misses them;
- an optimum-quanto module (`QLinear`, ...) not frozen yet: it still holds the float
  weight and quantises it on every call (`module.qweight`), which is what it computes with;
- a native torch quantised tensor (`is_quantized`).

Each such weight becomes a ParamView marked with its scheme (`quantized`), so it is judged
by `--quantized-min-cos` and not as an accidental cast.  Nothing here imports torchao or
quanto: their objects are recognised by type module name and duck typing.
"""

from __future__ import annotations

import inspect
from typing import Any

from parity.taps.backends import ParamView


def _short(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _library(obj: Any) -> str:
    module = type(obj).__module__ or ""
    if module.startswith("optimum.quanto"):
        return "quanto"
    return module.split(".")[0]


def is_subclass_quantized(t: Any) -> bool:
    """A tensor subclass that dequantises itself (torchao, quanto, ...).  A plain tensor's
    own `dequantize` (the identity on float tensors) does not count."""
    import torch

    if not isinstance(t, torch.Tensor) or type(t) in (torch.Tensor, torch.nn.Parameter):
        return False
    method = getattr(type(t), "dequantize", None)
    return callable(method) and method is not torch.Tensor.dequantize


def scheme(t: Any) -> str | None:
    """The quantisation scheme of a tensor in one line, or None for a dense one."""
    if getattr(t, "is_quantized", False) is True and not is_subclass_quantized(t):  # torch's own qint8/quint8
        return f"torch {_short(t.dtype)} {_qscheme(t)}"
    if not is_subclass_quantized(t):
        return None
    cls, library = type(t).__name__, _library(t)
    if library == "quanto":  # a scale per output channel (axis 0), or one for the tensor (axis None)
        axis, group = getattr(t, "axis", None), getattr(t, "_group_size", None)
        parts = [f"quanto {getattr(getattr(t, 'qtype', None), 'name', cls)}"]
        parts.append(f"axis {axis}" if axis is not None else "per-tensor")
        parts += [f"group {group}"] if group else []
        return ", ".join(parts)
    parts = [f"{library} {cls}", stored_dtype(t)]
    block = getattr(t, "block_size", None)
    if block is not None:
        parts.append(_granularity(list(block), list(t.shape)))
    if getattr(t, "act_quant_kwargs", None) is not None:
        parts.append("dynamic activation quantisation")
    return ", ".join(parts)


def _granularity(block: list[int], shape: list[int]) -> str:
    """torchao's block size in words: one scale per tensor, per row, per group of a row."""
    if block == shape:
        return "per-tensor"
    if len(block) == len(shape) >= 2 and all(b == 1 for b in block[:-1]):
        return "per-row" if block[-1] == shape[-1] else f"group {block[-1]}"
    return f"block {block}"


def _qscheme(t: Any) -> str:
    try:
        return _short(t.qscheme())
    except (RuntimeError, AttributeError):
        return "quantised"


def stored_dtype(t: Any) -> str:
    """The precision a quantised tensor is held in ("int8", "int4", "float8_e4m3fn"), not
    the dtype it dequantises to; a dense tensor's own dtype."""
    qtype = getattr(t, "qtype", None)  # quanto: qint4, qfloat8_e4m3fn, ...
    if qtype is not None and getattr(qtype, "name", None):
        return str(qtype.name).removeprefix("q")
    for attr in ("target_dtype", "qdata"):  # torchao: IntxUnpackedToInt8Tensor's int4; the raw data's dtype
        value = getattr(t, attr, None)
        if value is not None:
            return _short(getattr(value, "dtype", value))
    return _short(t.dtype)


def dense(t: Any) -> Any:
    """The values a (possibly quantised) tensor stands for, through the library's own
    `dequantize()`; any other tensor as it is (detached)."""
    import torch

    with torch.no_grad():
        if is_subclass_quantized(t) or getattr(t, "is_quantized", False) is True:
            t = t.dequantize()
        return t.detach()


def _view(t: Any, load, quantized: str | None = None) -> ParamView:
    return ParamView(dtype=stored_dtype(t) if quantized else _short(t.dtype), shape=tuple(t.shape), load=load,
                     quantized=quantized)


def _packed(module: Any) -> bool:
    """A torch.ao quantised module: `weight` (and `bias`) are methods unpacking packed params."""
    return inspect.ismethod(getattr(module, "weight", None)) and (
        hasattr(module, "_packed_params") or hasattr(module, "_weight_bias"))


def _packed_views(prefix: str, module: Any) -> dict[str, ParamView]:
    weight = module.weight()
    if getattr(weight, "is_quantized", False):
        what = f"{_short(weight.dtype)} {_qscheme(weight)}"
        dtype = _short(weight.dtype)
    else:  # fp16 dynamic quantisation: unpacked as float32, packed as float16
        dtype = _short(getattr(getattr(module, "_packed_params", None), "dtype", weight.dtype))
        what = dtype
    views = {f"{prefix}weight": ParamView(dtype=dtype, shape=tuple(weight.shape),
                                          load=lambda m=module: dense(m.weight()),
                                          quantized=f"torch.ao {module._get_name()}, {what}")}
    bias = module.bias() if inspect.ismethod(getattr(module, "bias", None)) else None
    if bias is not None:
        views[f"{prefix}bias"] = _view(bias, lambda m=module: dense(m.bias()))
    return views


def _quanto_module(module: Any) -> bool:
    """An optimum-quanto module quantising its weight (`QLinear`, `QConv2d`, ...)."""
    return getattr(module, "weight_qtype", None) is not None and hasattr(type(module), "qweight")


def model_parameters(model: Any) -> dict[str, ParamView]:
    """What a model computes with, per parameter name: its `named_parameters()` (shared
    weights once, under their first name), quantised weights dequantised and marked with
    their scheme, and torch.ao's packed weights, which are no parameters, under the names
    the float module had (`layer.weight`, `layer.bias`)."""
    import torch

    named = getattr(model, "named_modules", None)
    if named is None:  # not a torch module: whatever named_parameters() it offers
        if getattr(model, "named_parameters", None) is None:
            raise ValueError("the backend exposes no parameters (no Backend.parameters, no model.named_parameters)")
        return {name: _view(p, lambda p=p: dense(p), scheme(p)) for name, p in model.named_parameters()}
    views: dict[str, ParamView] = {}
    seen: set[int] = set()
    for prefix, module in named():
        prefix = f"{prefix}." if prefix else ""
        if _packed(module):
            views.update(_packed_views(prefix, module))
            continue
        quanto = _quanto_module(module)
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if quanto and name == "weight":  # what it computes with: the weight quantised on each call
                with torch.no_grad():
                    q = module.qweight
                views[prefix + name] = _view(q, lambda m=module: dense(m.qweight), scheme(q))
            else:
                views[prefix + name] = _view(p, lambda p=p: dense(p), scheme(p))
    return views
