"""What an `hf:` checkpoint folder must be before transformers builds anything from it.

transformers reads pickles (`pytorch_model.bin`), builds whatever sizes config.json
declares (10^7 layers, a hidden size of 10^6: gigabytes before the first weight is read)
and fills every parameter the weights lack at random, saying so only in a log line.  So,
in order: config.json is strict JSON; the weights are safetensors (a pickle is never
opened); no layer count exceeds the layers the weights hold and the model config.json
describes (built on the meta device: no memory) has no more parameters than the weights
hold; after loading, every parameter came from the weights, in its shape.  Each is a
ValueError in one line.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

# Weight files that are pickles: transformers would torch.load them.  Never read.
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_checkpoint(path: Path) -> dict:
    """The folder's config.json (strict JSON, an object), before transformers reads
    anything: ValueError for one that is not, and for a folder whose weights are not
    safetensors (a pickle is never opened, not even to be refused by torch.load)."""
    file = path / "config.json"
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"cannot read {file}: {exc}") from None
    except RecursionError:
        raise ValueError(f"cannot read {file}: nested too deeply to be a config") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object")
    names = config.get("architectures")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise ValueError(f"{file}: architectures must be a list of class names, got {repr(names)[:60]}")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for pattern in PICKLED_WEIGHTS for p in path.glob(pattern))
        held = f"it holds {', '.join(pickles[:3])}: pickles, which parity never opens; " if pickles else ""
        raise ValueError(f"{path} has no .safetensors weights ({held}save the model with "
                         "save_pretrained(..., safe_serialization=True))")
    return config


def model_class(transformers, names: list[str], path: Path):
    """The class config.json's `architectures` names (AutoModel if it names none that
    transformers has); ValueError if the name is something else of transformers' (a
    function, a module): what it loads is checked to be a model after loading."""
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is None:
            continue
        if not (isinstance(cls, type) and callable(getattr(cls, "from_pretrained", None))):
            raise ValueError(f"{path / 'config.json'}: architectures names {name!r}, which is not a transformers "
                             "model class")
        return cls
    return transformers.AutoModel


def check_loaded(transformers, model, info: dict, cls, path: Path) -> None:
    """What from_pretrained returned is a model whose every parameter came from the
    weights: transformers initialises missing ones at random (and says so only in a log
    line parity silences), which would compare two different random models."""
    if not isinstance(model, transformers.PreTrainedModel):
        raise ValueError(f"{path / 'config.json'}: architectures names {cls.__name__!r}, which loads a "
                         f"{type(model).__name__}, not a transformers model")
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ValueError(f"{path}: the weights leave {len(missing)} parameter(s) of the model config.json describes "
                         f"unfilled ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); parity never runs "
                         "a model with random weights")
    mismatched = [m if isinstance(m, str) else f"{m[0]} {list(m[1])} in the weights, {list(m[2])} in the model"
                  for m in sorted(info.get("mismatched_keys") or (), key=str)]
    if mismatched:
        raise ValueError(f"{path}: {len(mismatched)} weight(s) do not have the shape config.json describes "
                         f"({'; '.join(mismatched[:2])}{'; ...' if len(mismatched) > 2 else ''})")


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the headers of the folder's .safetensors files (no data
    is read)."""
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                keys = list(f.keys())
                shapes.update((key, tuple(f.get_slice(key).get_shape())) for key in keys)
        except (OSError, SafetensorError) as exc:
            raise ValueError(f"cannot read {file}: {exc}") from None
    return shapes


LAYER_COUNT = re.compile(r"num_(?:\w+_)?layers|n_layers?")  # num_hidden_layers, num_layers, n_layer, ...


def _layer_counts(config: dict) -> Iterator[tuple[str, int]]:
    """(dotted key, value) of every layer count in config.json, sub-configs included."""
    todo: list[tuple[str, dict]] = [("", config)]
    while todo:
        where, table = todo.pop()
        for key, value in table.items():
            if isinstance(value, dict):
                todo.append((f"{where}{key}.", value))
            elif LAYER_COUNT.fullmatch(str(key)) and isinstance(value, int) and not isinstance(value, bool):
                yield f"{where}{key}", value


def check_layers(config: dict, shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """No layer count of config.json beyond the layers the weights hold (one more than
    the largest index in a key, `model.layers.2.mlp...`): transformers would build them
    all before noticing that the weights leave them empty."""
    indices = [int(part) for key in shapes for part in key.split(".") if part.isdigit()]
    if not indices:
        return
    held = max(indices) + 1
    for key, count in sorted(_layer_counts(config)):
        if count > held:
            raise ValueError(f"{path / 'config.json'}: {key} {count}, but the weights hold at most {held} layers")


def check_size(cls, config, shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """The model config.json describes, built on the meta device (shapes, no memory), has
    no more parameters than the weights hold: what the weights cannot fill would be random,
    and its sizes are config.json's to inflate."""
    import torch

    if getattr(config, "quantization_config", None) is not None:  # packed weights: counts differ by design
        return
    build = getattr(cls, "from_config", None) or getattr(cls, "_from_config", None)  # Auto class or model class
    if build is None:
        return  # not a model class: refused after loading
    try:
        with torch.device("meta"):
            model = build(config)
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return  # loading raises the same, in one line
    if not callable(getattr(model, "parameters", None)):
        return
    needed = sum(p.numel() for p in model.parameters())
    held = sum(math.prod(s) for s in shapes.values())
    if needed > held:
        raise ValueError(f"{path}: config.json describes a model of {needed:,} parameters, but the weights hold "
                         f"{held:,}: the rest would be random")


def config_errors() -> tuple[type[BaseException], ...]:
    """What transformers raises for a config.json it cannot take: OSError (unreadable),
    TypeError and huggingface_hub's strict field checks (a field of the wrong type)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # an older huggingface_hub: no strict fields
        return (OSError, TypeError)
    return (OSError, TypeError, StrictDataclassError)


def one_line(exc: BaseException, limit: int = 300) -> str:
    """A third-party message on one line (theirs can run for pages)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + " ..."
