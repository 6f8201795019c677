"""The hooks behind the tree's view taps (`tree.TREE`, kind "view").

Each hook observes a user module and hands a value to a parity-owned `TapPoint` of the
wrapper; it never changes what the module returns.  Nothing is computed while no hook is
installed on that TapPoint (no capture running), so the wrapped model runs as it is.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from parity.probes.pi05.layers import TapPoint
from parity.probes.pi05_tree.tree import TREE, Source, view_key


def _listened(point: nn.Module) -> bool:
    return bool(point._forward_hooks or point._forward_pre_hooks)


def _tensor(value, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{what} is {type(value).__name__}, not a tensor")
    return value


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE of x [B, T, H, D] by HF-style tables cos/sin [B, T, D] (or [T, D]),
    computed in float32 (float64 for a float64 x) and cast once, as the reference does."""
    wide = torch.promote_types(x.dtype, torch.float32)
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    c, s = cos.to(wide)[:, :, None, :], sin.to(wide)[:, :, None, :]
    xf = x.to(wide)
    half = x.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * c + rotated * s).to(x.dtype)


class Views:
    """The view TapPoints of one wrapped tree and the hooks feeding them."""

    def __init__(self, tree: nn.Module, root: str, head_dims: dict[str, int], vision_rows: int, cameras: int):
        self.points = nn.ModuleDict()
        self.handles: list = []
        self.head_dims = head_dims
        self.vision_rows, self.cameras = vision_rows, cameras
        self.gathered: dict[str, list[torch.Tensor]] = {}
        self.tables: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}  # id(attention) -> (cos, sin)
        modules = dict(tree.named_modules())
        for name, module in modules.items():
            if not name.startswith(root):
                continue
            rel = name[len(root):]
            for source in TREE:
                if source.kind != "view":
                    continue
                m = re.fullmatch(source.pattern, rel)
                if m is None:
                    continue
                layer = int(m.group("layer")) if "layer" in m.groupdict() else None
                key = view_key(source, layer)
                point = self.points[key] = TapPoint()
                attention = modules.get(name.rpartition(".")[0]) if source.how == "rope" else None
                self._hook(module, source, key, point, attention)

    def reset(self) -> None:
        """Before a run: no half-gathered vision tap, no stale RoPE table."""
        self.gathered.clear()
        self.tables.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    # ---- hooks ------------------------------------------------------------------
    def _hook(self, module: nn.Module, source: Source, key: str, point: nn.Module, attention) -> None:
        if attention is not None and id(attention) not in self.tables:
            self.tables[id(attention)] = None
            self.handles.append(attention.register_forward_pre_hook(self._tables_hook(attention), with_kwargs=True))
        if source.on == "input":
            def pre(mod, args, kwargs):
                if _listened(point):
                    self._emit(source, key, point, self._input(source, args, kwargs, key), attention)
            self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(mod, args, output):
                if _listened(point):
                    value = output
                    if source.select is not None and isinstance(value, (tuple, list)):
                        value = value[source.select]
                    self._emit(source, key, point, _tensor(value, f"view {key}: the module output"), attention)
            self.handles.append(module.register_forward_hook(post))

    def _tables_hook(self, attention):
        def pre(mod, args, kwargs):
            tables = kwargs.get("position_embeddings")
            if tables is None and len(args) > 1 and isinstance(args[1], (tuple, list)):
                tables = args[1]
            self.tables[id(attention)] = tables
        return pre

    @staticmethod
    def _input(source: Source, args: tuple, kwargs: dict, key: str) -> torch.Tensor:
        if source.how == "cond":
            value = args[1] if len(args) > 1 else kwargs.get("cond")
            return _tensor(value, f"view {key}: the norm's cond argument")
        value = args[0] if args else kwargs.get("hidden_states")
        return _tensor(value, f"view {key}: the module input")

    def _emit(self, source: Source, key: str, point: nn.Module, value: torch.Tensor, attention) -> None:
        if source.how in ("heads", "rope"):
            head_dim = self.head_dims[source.stack]
            value = value.reshape(*value.shape[:-1], value.shape[-1] // head_dim, head_dim)
        if source.how == "rope":
            tables = self.tables.get(id(attention))
            if tables is None:
                raise RuntimeError(f"view {key}: the attention module got no position_embeddings (cos, sin), so "
                                   "its post-RoPE q/k cannot be observed")
            value = rotate(value, *tables)
        if source.gather:
            parts = self.gathered.setdefault(key, [])
            parts.append(value)
            rows = sum(p.shape[0] for p in parts)
            if rows < self.vision_rows:
                return
            del self.gathered[key]
            if rows != self.vision_rows or len(parts) not in (1, self.cameras):
                raise RuntimeError(f"view {key}: the vision tower ran {len(parts)} call(s) of {rows} image(s); "
                                   f"expected one per camera ({self.cameras}) or one of all {self.vision_rows}")
            if len(parts) > 1:
                value = torch.cat(parts)  # per-camera calls: rows camera-major already
            elif self.cameras > 1:  # one call over [B, C] images flattened sample-major: make it camera-major
                value = value.reshape(-1, self.cameras, *value.shape[1:]).transpose(0, 1).flatten(0, 1)
        point(value)
