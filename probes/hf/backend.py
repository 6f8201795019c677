"""The `hf` backend: any local `transformers` checkpoint as reference or candidate.

    parity diff --ref 'hf:./m@attn=eager,dtype=float32' --cand 'hf:./m@attn=sdpa,dtype=float32'

The model class comes from the checkpoint's config (`architectures`), the probe from its
`model_type` (families.py), the inputs from `--input` or the seed (inputs.py).  Nothing is
patched: hooks observe the model exactly as transformers runs it.
"""
from __future__ import annotations

import contextlib
import json
import platform
from pathlib import Path
from typing import Any

from parity.probes.hf.families import TOKENS, Family, probe_for
from parity.probes.hf.inputs import (
    DEFAULT_SEQ_LEN,
    Prompts,
    check_positions,
    check_rows,
    generate_pixels,
    generate_rows,
    pad,
    read_inputs,
    token_layout,
)
from parity.probes.hf.spec import USAGE, HFSpec
from parity.taps.backends import Backend, BackendOptions
from parity.taps.records import Region

DEFAULT_PADDING = "right"


def _torch_dtype(torch, name: str | None):
    return "auto" if name is None else getattr(torch, name)


def _device(torch, name: str):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device cuda requested but no CUDA device is available")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {name!r} is not a device: give cpu, cuda or cuda:N") from None
    if device.type == "meta":
        raise ValueError("device meta holds no values, so nothing could be compared; give cpu, cuda or cuda:N")
    return device


@contextlib.contextmanager
def _quiet_transformers(transformers):
    """Loading a checkpoint prints progress bars and config warnings; parity's output
    should not carry them.  transformers' own settings are restored afterwards."""
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


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
        raise ValueError(f"{file}: architectures must be a list of class names, got {names!r}")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for pattern in PICKLED_WEIGHTS for p in path.glob(pattern))
        held = f"it holds {', '.join(pickles[:3])}: pickles, which parity never opens; " if pickles else ""
        raise ValueError(f"{path} has no .safetensors weights ({held}save the model with "
                         "save_pretrained(..., safe_serialization=True))")
    return config


def _model_class(transformers, names: list[str], path: Path):
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


def _check_loaded(transformers, model, info: dict, cls, path: Path) -> None:
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


def load_model(spec: HFSpec, dtype: str | None, device):
    """The checkpoint's own class (config.architectures), eval mode, on `device`;
    safetensors weights only."""
    import torch
    import transformers

    check_checkpoint(spec.path)
    with _quiet_transformers(transformers):
        try:
            config = transformers.AutoConfig.from_pretrained(spec.path)
        except _config_errors() as exc:
            raise ValueError(f"cannot read {spec.path / 'config.json'}: {_one_line(exc)}") from None
        cls = _model_class(transformers, getattr(config, "architectures", None) or [], spec.path)
        kwargs: dict[str, Any] = {"dtype": _torch_dtype(torch, dtype), "use_safetensors": True}
        if spec.attn is not None:
            kwargs["attn_implementation"] = spec.attn
        try:
            # mismatched shapes are reported (and refused below) rather than raised as a page of text
            loaded = cls.from_pretrained(spec.path, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
        except (ImportError, RuntimeError, *_config_errors()) as exc:
            # flash_attention_2 not installed, unreadable weights, sizes config.json and the weights disagree on
            raise ValueError(f"cannot load {spec.path}: {_one_line(exc)}") from None
        model, info = loaded if isinstance(loaded, tuple) and len(loaded) == 2 else (loaded, {})
        _check_loaded(transformers, model, info, cls, spec.path)
    return model.to(device).eval(), config


def _config_errors() -> tuple[type[BaseException], ...]:
    """What transformers raises for a config.json it cannot take: OSError (unreadable),
    TypeError and huggingface_hub's strict field checks (a field of the wrong type)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # an older huggingface_hub: no strict fields
        return (OSError, TypeError)
    return (OSError, TypeError, StrictDataclassError)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """A third-party message on one line (theirs can run for pages)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _vision_config(config):
    return getattr(config, "vision_config", None) or config


def make_prompts(family: Family, config, opts: BackendOptions) -> Prompts:
    """The rows both sides see: from opts.inputs, else generated from the seed."""
    text, vision = _text_config(config), _vision_config(config)
    pixels_needed = family.inputs in ("image", "image_text")
    rows: list[list[int]] = []
    pixels = None
    source = f"seed {opts.seed}"
    if opts.inputs is not None:
        rows, pixels, source = read_inputs(opts.inputs)
        if pixels is not None and not pixels_needed:
            raise ValueError(f"{source}: this model takes token ids, not images")
    positions = getattr(text, "max_position_embeddings", None)
    if family.inputs != "image":
        if not rows:
            seq_len = opts.seq_len or DEFAULT_SEQ_LEN
            prefix: tuple[int, ...] = ()
            avoid = tuple(i for i in (getattr(text, "pad_token_id", None),) if i is not None)
            if family.inputs == "image_text":
                n_img = _image_tokens(config)
                bos = getattr(text, "bos_token_id", None)
                prefix = (config.image_token_id,) * n_img + ((bos,) if bos is not None else ())
                avoid += (config.image_token_id,)
                seq_len = opts.seq_len or len(prefix) + DEFAULT_SEQ_LEN // 2
            check_positions(seq_len, positions, family.position_offset, "--seq-len")
            rows = generate_rows(opts.seed, opts.batch, seq_len, text.vocab_size, prefix, avoid)
        check_rows(rows, text.vocab_size, source)
        longest = max(range(len(rows)), key=lambda i: len(rows[i]))
        check_positions(len(rows[longest]), positions, family.position_offset, f"{source}: row {longest}")
    elif rows:
        raise ValueError(f"{source}: this model takes images, not token ids")
    if pixels_needed:
        n = len(rows) if rows else opts.batch
        if pixels is None:
            pixels = generate_pixels(opts.seed, n, getattr(vision, "num_channels", 3), vision.image_size)
        elif pixels.shape[0] != n:
            raise ValueError(f"{source}: {pixels.shape[0]} images for {n} prompts")
    return Prompts(tuple(tuple(r) for r in rows), pixels, source)


def _image_tokens(config) -> int:
    n = getattr(config, "num_image_tokens", None) or getattr(_text_config(config), "num_image_tokens", None)
    if n is None:
        v = _vision_config(config)
        n = (v.image_size // v.patch_size) ** 2
    return int(n)


def _regions(family: Family, config, length: int) -> tuple[Region, ...]:
    """Named spans of canonical positions: PaliGemma's image tokens, then its text."""
    if family.inputs != "image_text":
        return ()
    n = min(_image_tokens(config), length)
    return (Region("image", 0, n), Region("text", n, length))


def factory(opts: BackendOptions, arg: str) -> Backend:
    """any local transformers model (Llama, Gemma, Gemma2, Qwen2/3, Phi3, SigLIP, ViT, PaliGemma probes)"""
    import torch
    import transformers

    spec = HFSpec.parse(arg)
    if opts.faults:
        raise ValueError("hf backends have no fault catalogue; plant a bug with your own package.module:factory")
    if opts.weights is not None or opts.config is not None:
        raise ValueError("hf backends load the checkpoint at hf:PATH; --weights and --config apply to the "
                         "pi0.5 backends")
    dtype = spec.dtype or opts.dtype
    if dtype is not None and spec.dtype is None:
        HFSpec(spec.path, dtype=dtype).validate()
    device = _device(torch, spec.device or opts.device)
    model, config = load_model(spec, dtype, device)
    model_type = getattr(config, "model_type", "?")
    probe, family, how = probe_for(model, model_type, _text_config(config))
    prompts = make_prompts(family, config, opts)
    padding = spec.padding or opts.padding or DEFAULT_PADDING
    pad_id = getattr(_text_config(config), "pad_token_id", None) or 0
    batch = pad(prompts, padding, pad_id, family.position_offset)
    layout = None
    if batch.input_ids is not None:
        layout = token_layout(prompts, batch, _regions(family, config, batch.input_ids.shape[1]))

    kwargs: dict[str, Any] = {}
    if batch.input_ids is not None:
        kwargs.update(input_ids=torch.from_numpy(batch.input_ids).to(device),
                      attention_mask=torch.from_numpy(batch.attention_mask).to(device),
                      position_ids=torch.from_numpy(batch.position_ids).to(device), use_cache=False)
        if family.prefix_lm:
            kwargs["token_type_ids"] = torch.zeros_like(kwargs["input_ids"])
    if batch.pixels is not None:
        kwargs["pixel_values"] = torch.from_numpy(batch.pixels).to(device=device, dtype=model.dtype)
    call = torch.compile(model, backend=spec.compile) if spec.compile else model

    def run():
        with torch.no_grad():
            return call(**kwargs)

    meta = {
        "arch": probe.arch,
        "probe": how,
        "model": str(spec.path),
        "model_class": type(model).__name__,
        "attn": getattr(model.config, "_attn_implementation", None),
        "dtype": str(model.dtype).removeprefix("torch."),
        "compile": spec.compile,
        "padding": padding if batch.input_ids is not None else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "seed": opts.seed,
        "batch": len(prompts.rows) if prompts.rows else int(batch.pixels.shape[0]),
        "inputs": prompts.source,
        "input_fingerprint": prompts.fingerprint(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    return Backend(name="hf", model=model, probe=probe, run=run,
                   layouts=lambda: {TOKENS: layout} if layout is not None else {}, meta=meta, inputs=kwargs)


factory.usage = USAGE
