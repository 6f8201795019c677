"""Loading a user's pi0.5 checkpoint (safetensors only) into our model.

Every key is accounted for and every shape and dtype checked, from the file's header,
before a single value is read: a missing, unexpected or mis-shaped key is a ValueError
that lists them all (one line each, at most MAX_LINES), never a model that quietly keeps
random weights (lerobot 0.6.1 prints the exception and returns the untrained model).
safetensors holds no code, so nothing is unpickled.

The sizes come from the weights' shapes (widths, depths, MLP sizes, vocabulary, patch,
image size, action dim) and from config.json (action horizon, steps, prompt length),
unless `--config` names them, in which case the shapes must be exactly that config's.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from types import MappingProxyType

import torch
from safetensors import SafetensorError, safe_open

from parity.probes.pi05.ckpt_layout import KeyMap, file_key, map_keys, natural
from parity.probes.pi05.config import CONFIGS, TINY, GemmaConfig, Pi05Config, VisionConfig
from parity.taps.backends import DetailedError

MAX_LINES = 20
FILE_NAME = "model.safetensors"
# safetensors dtype -> our name; anything else (ints, fp8, bool) cannot be a dense pi0.5 weight
FLOAT_DTYPES: Mapping[str, str] = MappingProxyType({"F64": "float64", "F32": "float32", "BF16": "bfloat16",
                                                    "F16": "float16"})
# config.json fields (openpi's converter, lerobot's policy config) for what weights cannot tell
CONFIG_JSON_FIELDS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "action_horizon": ("action_horizon", "chunk_size"),
    "num_steps": ("num_steps", "num_inference_steps"),
    "max_token_len": ("max_token_len", "tokenizer_max_length"),
})


def problems_error(title: str, problems: list[str]) -> ValueError:
    """One ValueError: a title line, then one line per problem, at most MAX_LINES of them
    (a DetailedError, so the CLI shows every line, not just the title)."""
    shown = [f"  {p}" for p in problems[:MAX_LINES]]
    if len(problems) > MAX_LINES:
        shown.append(f"  ... and {len(problems) - MAX_LINES} more")
    return DetailedError("\n".join([title, *shown]))


def resolve_paths(path: str | Path) -> tuple[Path, Path | None]:
    """(the .safetensors file, its config.json or None) from a directory or a file path."""
    p = Path(path).expanduser()
    if p.is_dir():
        file = p / FILE_NAME
        if not file.is_file():
            sharded = " (sharded checkpoints are not supported)" if (p / f"{FILE_NAME}.index.json").exists() else ""
            raise ValueError(f"weights directory {p} has no {FILE_NAME}{sharded}")
    elif p.is_file():
        if p.suffix != ".safetensors":
            raise ValueError(f"weights {p}: only .safetensors files are read (no pickle, no torch.load)")
        file = p
    else:
        raise ValueError(f"weights {p}: no such file or directory")
    config = file.parent / "config.json"
    return file, (config if config.is_file() else None)


def _read_config_json(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"cannot read {path}: {exc}") from None
    except RecursionError:
        raise ValueError(f"cannot read {path}: nested too deeply to be a config") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint's header, read against a layout: no tensor data is loaded yet."""

    path: Path
    keymap: KeyMap
    shapes: dict[str, tuple[int, ...]]  # our name -> shape in the file
    dtypes: dict[str, str]  # our name -> safetensors dtype ("BF16", ...)
    num_keys: int
    config_json: dict

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        file, config_path = resolve_paths(path)
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                keys = list(f.keys())
                keymap = map_keys(keys)
                slices = {name: f.get_slice(key) for name, key in keymap.sources.items()}
                shapes = {name: tuple(s.get_shape()) for name, s in slices.items()}
                dtypes = {name: s.get_dtype() for name, s in slices.items()}
        except (OSError, SafetensorError) as exc:
            raise ValueError(f"cannot read checkpoint {file}: {exc}") from None
        return cls(file, keymap, shapes, dtypes, len(keys), _read_config_json(config_path))

    @property
    def layout(self) -> str:
        return self.keymap.layout

    # ---- sizes --------------------------------------------------------------------
    def config_for(self, name: str | None) -> Pi05Config:
        """The config to build: `name`'s sizes if given (the shapes must then match), else
        the sizes the weights hold; horizon, steps and prompt length from config.json."""
        empty = [f"{self.keymap.sources[n]} {list(self.shapes[n])}" for n in sorted(self.shapes, key=natural)
                 if 0 in self.shapes[n]]
        if empty:  # no size can be read from them (and none divides)
            more = f" and {len(empty) - 3} more" if len(empty) > 3 else ""
            raise ValueError(f"checkpoint {self.path} holds {len(empty)} empty tensor(s): {', '.join(empty[:3])}{more}")
        if name is None and _names_full_size(self.config_json):
            name = "full"  # openpi's and lerobot's config.json name the real variants
        base = _named(name) if name is not None else infer_config(self.shapes)
        return _with_config_json(base, self.config_json)

    # ---- checks -------------------------------------------------------------------
    def check(self, cfg: Pi05Config) -> None:
        """ValueError listing every key that is unexpected, missing, mis-shaped or of a
        dtype that cannot hold a pi0.5 weight."""
        expected = expected_shapes(cfg)
        problems = self._size_mismatch(cfg) + list(self.keymap.problems)
        for name in sorted(set(self.keymap.sources) - set(expected), key=natural):
            problems.append(f"unexpected key {self.keymap.sources[name]} (config {cfg.name} has no {name})")
        for name in sorted(set(expected) - set(self.keymap.sources), key=natural):
            problems.append(f"missing key {file_key(name, self.layout)} {list(expected[name])} (our {name})")
        for name in sorted(set(expected) & set(self.keymap.sources), key=natural):
            got, want = self.shapes[name], expected[name]
            if got != want:
                hint = " (transposed?)" if len(got) == 2 and got == want[::-1] else ""
                problems.append(f"{self.keymap.sources[name]}: shape {list(got)}, expected {list(want)}{hint}")
            if self.dtypes[name] not in FLOAT_DTYPES:
                problems.append(f"{self.keymap.sources[name]}: dtype {self.dtypes[name]} is not a float weight")
        action_dim = self.config_json.get("action_dim")
        if action_dim is not None and action_dim != cfg.action_dim:
            problems.append(f"config.json action_dim {action_dim} but the weights have {cfg.action_dim}")
        if problems:
            raise problems_error(f"checkpoint {self.path} ({self.layout} layout) does not fit pi0.5 config "
                                 f"{cfg.name}: {len(problems)} problem(s)", problems)

    def _size_mismatch(self, cfg: Pi05Config) -> list[str]:
        """One line when the weights hold other sizes than the config asked for."""
        try:
            held = infer_config(self.shapes)
        except ValueError:
            return []
        differ = [f"{what} {a} (config {b})" for what, a, b in _size_fields(held, cfg) if a != b]
        if not differ:
            return []
        return [f"the weights are {'config ' + held.name if held.name != 'custom' else 'another size'}, not "
                f"{cfg.name}: {', '.join(differ[:4])}{', ...' if len(differ) > 4 else ''}; leave out --config to "
                "use the sizes the weights hold"]

    # ---- loading ------------------------------------------------------------------
    @torch.no_grad()
    def load_into(self, model: torch.nn.Module) -> None:
        """Copy every parameter of `model` from the file (cast to the parameter's dtype).
        `check` must have passed; a parameter without a key or a non-finite value is a
        ValueError, so no parameter can keep the values it was built with."""
        params = dict(model.named_parameters())
        uncovered = sorted(set(params) - set(self.keymap.sources), key=natural)
        if uncovered:
            raise problems_error(f"checkpoint {self.path} leaves {len(uncovered)} parameter(s) unloaded",
                                 [f"no key for {n}" for n in uncovered])
        bad = []
        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as f:
                for name, param in params.items():
                    key = self.keymap.sources[name]
                    value = f.get_tensor(key)
                    if not bool(torch.isfinite(value).all()):
                        bad.append(f"{key}: {int((~torch.isfinite(value)).sum())} NaN/Inf value(s)")
                        continue
                    param.copy_(value.reshape(param.shape))
        except (OSError, SafetensorError) as exc:
            raise ValueError(f"cannot read checkpoint {self.path}: {exc}") from None
        if bad:
            raise problems_error(f"checkpoint {self.path} holds non-finite weights", bad)

    def describe(self) -> dict:
        """What the run metadata records about the weights (JSON-safe)."""
        counts = Counter(FLOAT_DTYPES.get(d, d) for d in self.dtypes.values())
        return {"path": str(self.path), "layout": self.layout, "keys": self.num_keys,
                "loaded": len(self.keymap.sources), "loaded_dtypes": dict(sorted(counts.items())),
                "unused_keys": sorted(self.keymap.unused), "notes": list(self.keymap.notes)}


def expected_shapes(cfg: Pi05Config) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes for a config, from a model built on the meta device
    (no memory, whatever the size)."""
    from parity.probes.pi05.faults import Faults
    from parity.probes.pi05.model import Pi05Policy, Variant

    with torch.device("meta"):
        model = Pi05Policy(cfg, Variant(), Faults())
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _size_fields(a: Pi05Config, b: Pi05Config):
    """(what, a's value, b's value) for the sizes the weights determine."""
    for part in ("vision", "llm", "expert"):
        for f in fields(getattr(a, part)):
            yield f"{part} {f.name}", getattr(getattr(a, part), f.name), getattr(getattr(b, part), f.name)
    for name in ("vocab_size", "action_dim"):
        yield name, getattr(a, name), getattr(b, name)


def _named(name: str) -> Pi05Config:
    if name not in CONFIGS:
        raise ValueError(f"unknown pi0.5 config {name!r}; known: {', '.join(CONFIGS)}")
    return CONFIGS[name]


def _with_config_json(cfg: Pi05Config, data: dict) -> Pi05Config:
    """`cfg` with what config.json sets; ValueError naming the key for a value the model
    cannot take (not a positive integer, more steps or positions than it declares)."""
    overrides, keys_used = {}, {}
    for field_name, keys in CONFIG_JSON_FIELDS.items():
        for key in keys:
            if key in data:
                value = data[key]
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ValueError(f"config.json: {key} must be a positive integer, got {value!r}")
                overrides[field_name], keys_used[field_name] = value, key
                break
    changed = {k: v for k, v in overrides.items() if getattr(cfg, k) != v}
    if not changed:
        return cfg
    suffix = ",".join(f"{k}={v}" for k, v in changed.items())
    try:
        return replace(cfg, name=f"{cfg.name}({suffix})", **changed)
    except ValueError as exc:
        given = ", ".join(f"{keys_used[k]} {v}" for k, v in changed.items())
        raise ValueError(f"config.json ({given}): {exc}") from None


def _common(shapes: dict[str, tuple[int, ...]], pattern: str, axis: int, default: int) -> int:
    """The most common size along `axis` of the parameters matching `pattern` (one odd
    layer then shows up as that layer's mis-shaped key, not as a different model)."""
    sizes = [s[axis] for n, s in shapes.items() if re.fullmatch(pattern, n) and len(s) > axis]
    return Counter(sizes).most_common(1)[0][0] if sizes else default


def _depth(shapes: dict[str, tuple[int, ...]], stack: str, default: int) -> int:
    layers = {int(m.group(1)) for n in shapes if (m := re.match(rf"{stack}\.layers\.(\d+)\.", n))}
    return max(layers) + 1 if layers else default


def _names_full_size(data: dict) -> bool:
    return data.get("paligemma_variant") == "gemma_2b" and data.get("action_expert_variant") == "gemma_300m"


def _base(shapes: dict[str, tuple[int, ...]]) -> Pi05Config:
    """The named config whose head layout a checkpoint shares: the one with the same
    vision width, else tiny."""
    width = _common(shapes, r"vision\.layers\.\d+\.self_attn\.q_proj\.weight", 1, -1)
    return next((c for c in CONFIGS.values() if c.vision.width == width), TINY)


def _heads(q_rows: int, k_rows: int, base: GemmaConfig, what: str) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim): q and k are stored flattened, so the number of
    K/V heads is taken from the base config (1 in pi0.5: multi-query attention)."""
    kv = base.num_kv_heads
    if q_rows < 1 or k_rows < kv or k_rows % kv or q_rows % (k_rows // kv):
        raise ValueError(f"cannot split {what} attention: q rows {q_rows}, k rows {k_rows}, {kv} K/V head(s)")
    head_dim = k_rows // kv
    return q_rows // head_dim, kv, head_dim


def infer_config(shapes: dict[str, tuple[int, ...]]) -> Pi05Config:
    """The pi0.5 sizes a checkpoint's weights hold.  Anything the shapes cannot tell (the
    head split, and a size whose key is missing) comes from the base config; the check
    that follows reports the missing keys."""
    base = _base(shapes)
    patch = _common(shapes, r"vision\.patch_embedding\.weight", 2, base.vision.patch_size)
    tokens = _common(shapes, r"vision\.position_embedding", 0, base.vision.num_tokens)
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"vision position embedding has {tokens} rows: not a square grid of patches")
    v_width = _common(shapes, r"vision\.layers\.\d+\.self_attn\.q_proj\.weight", 1, base.vision.width)
    if v_width % base.vision.head_dim:
        raise ValueError(f"vision width {v_width} does not split into heads of {base.vision.head_dim}")
    vision = VisionConfig(
        width=v_width, depth=_depth(shapes, "vision", base.vision.depth),
        mlp_dim=_common(shapes, r"vision\.layers\.\d+\.mlp\.fc1\.weight", 0, base.vision.mlp_dim),
        num_heads=v_width // base.vision.head_dim, patch_size=patch, image_size=side * patch)

    def gemma(stack: str, b: GemmaConfig) -> GemmaConfig:
        attn = rf"{stack}\.layers\.\d+\.self_attn\."
        width = _common(shapes, attn + r"q_proj\.weight", 1, b.width)
        heads, kv, head_dim = _heads(_common(shapes, attn + r"q_proj\.weight", 0, b.num_heads * b.head_dim),
                                     _common(shapes, attn + r"k_proj\.weight", 0, b.num_kv_heads * b.head_dim),
                                     b, stack)
        return GemmaConfig(width=width, depth=_depth(shapes, stack, b.depth),
                           mlp_dim=_common(shapes, rf"{stack}\.layers\.\d+\.mlp\.gate_proj\.weight", 0, b.mlp_dim),
                           num_heads=heads, num_kv_heads=kv, head_dim=head_dim)

    cfg = replace(base, name="custom", vision=vision, llm=gemma("prefix", base.llm),
                  expert=gemma("expert", base.expert),
                  vocab_size=_common(shapes, r"embed_tokens\.weight", 0, base.vocab_size),
                  action_dim=_common(shapes, r"action_in_proj\.weight", 1, base.action_dim))
    for named in CONFIGS.values():
        if all(getattr(cfg, f.name) == getattr(named, f.name) for f in fields(cfg) if f.name != "name"):
            return named
    return cfg
