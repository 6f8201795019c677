"""The `hf` backend: any local `transformers` checkpoint as reference or candidate.

    parity diff --ref 'hf:./m@attn=eager,dtype=float32' --cand 'hf:./m@attn=sdpa,dtype=float32'

The model class comes from the checkpoint's config (`architectures`), the probe from its
`model_type` (families.py), the inputs from `--input` or the seed (inputs.py).  Nothing is
patched: hooks observe the model exactly as transformers runs it.
"""
from __future__ import annotations

import contextlib
import platform
from typing import Any

from parity.probes.hf.checkpoint import (
    check_checkpoint,
    check_layers,
    check_loaded,
    check_size,
    config_errors,
    model_class,
    one_line,
    weight_shapes,
)
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
from parity.probes.hf.registry import check_family, family_inputs, family_layouts, float64_experts
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


def load_model(spec: HFSpec, dtype: str | None, device):
    """The checkpoint's own class (config.architectures), eval mode, on `device`;
    safetensors weights only, every parameter from them (checkpoint.py checks)."""
    import torch
    import transformers

    raw = check_checkpoint(spec.path)
    shapes = weight_shapes(spec.path)
    check_layers(raw, shapes, spec.path)
    with _quiet_transformers(transformers):
        try:
            config = transformers.AutoConfig.from_pretrained(spec.path)
        except config_errors() as exc:
            raise ValueError(f"cannot read {spec.path / 'config.json'}: {one_line(exc)}") from None
        # a family parity has no probe for is refused here, before any weight is read
        check_family(getattr(config, "model_type", "?"), config, shapes).refuse()
        cls = model_class(transformers, getattr(config, "architectures", None) or [], spec.path)
        check_size(cls, config, shapes, spec.path)
        kwargs: dict[str, Any] = {"dtype": _torch_dtype(torch, dtype), "use_safetensors": True}
        if spec.attn is not None:
            kwargs["attn_implementation"] = spec.attn
        try:
            # mismatched shapes are reported (and refused below) rather than raised as a page of text
            loaded = cls.from_pretrained(spec.path, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
        except (ImportError, RuntimeError, *config_errors()) as exc:
            # flash_attention_2 not installed, unreadable weights, sizes config.json and the weights disagree on
            raise ValueError(f"cannot load {spec.path}: {one_line(exc)}") from None
        model, info = loaded if isinstance(loaded, tuple) and len(loaded) == 2 else (loaded, {})
        check_loaded(transformers, model, info, cls, spec.path)
    return model.to(device).eval(), config


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
    float64_experts(model)  # an MoE model's default experts kernel refuses float64 on the CPU
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
    family_inputs(family, config, kwargs, opts.seed)  # e.g. T5's decoder inputs, SiglipModel's text
    call = torch.compile(model, backend=spec.compile) if spec.compile else model

    def run():
        with torch.no_grad():
            return call(**kwargs)

    def get_layouts():
        return {TOKENS: layout, **family_layouts(probe, layout)} if layout is not None else {}

    feed = None
    if opts.decode:
        probe, run, get_layouts, feed = _decoding(model, config, family, probe, prompts, batch, layout, kwargs, call,
                                                  opts, spec.cache or "dynamic")
    elif spec.cache is not None:
        raise ValueError("hf option cache applies to --decode runs")

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
    if opts.decode:
        meta.update(decode=opts.decode, cache=spec.cache or "dynamic")
    return Backend(name="hf", model=model, probe=probe, run=run, layouts=get_layouts, meta=meta, inputs=kwargs,
                   widen=lambda dtype: _widened(model, kwargs, dtype), feed=feed)


def _decoding(model, config, family, probe, prompts, batch, layout, kwargs, call, opts, cache: str):
    """(probe, run, layouts, feed) of a --decode run (probes/hf/decode.py)."""
    from parity.probes.hf import decode

    text = _text_config(config)
    if family.inputs != "text" or family.logits is None or layout is None:
        raise ValueError(f"--decode applies to causal language models; this is a {family.name} model "
                         f"({family.inputs} inputs)")
    if not callable(getattr(model, "get_output_embeddings", None)) or model.get_output_embeddings() is None:
        raise ValueError("--decode needs a model with a language-model head (logits)")
    flat = sorted({r.layout for r in probe.rules if r.layout not in (None, TOKENS)})
    if flat:
        raise ValueError(f"--decode does not lay out this family's flattened taps ({', '.join(flat)}: MoE routers "
                         "and experts) per step yet; diff its prefill without --decode")
    n_layers = int(text.num_hidden_layers)
    taps = decode.kv_taps(model, n_layers)
    state: dict = {}

    def run():
        return decode.decoding_run(call, text, kwargs, opts.decode, cache, taps, opts.feed, state,
                                   family.position_offset)

    lengths = [len(r) for r in prompts.rows]
    width = batch.input_ids.shape[1]
    layouts = decode.layouts(layout, list(batch.starts), lengths, opts.decode,
                             width + opts.decode if cache == "static" else None)
    return (decode.decode_probe(probe, "decoder"), run, lambda: layouts,
            lambda: state.get("tokens"))


@contextlib.contextmanager
def _widened(model, inputs: dict, dtype):
    """The model upcast to `dtype` (parity's oracle run), its eager attention run through
    SDPA meanwhile: transformers' eager attention takes its softmax in float32, which
    rounds the oracle there and turns a float64 mask's minimum into -inf (a fully masked
    padding row, then NaN everywhere it is read).  Put back as it was afterwards."""
    from parity.comparison.oracle import upcast
    from parity.probes.hf.registry import eager_experts

    before = getattr(model.config, "_attn_implementation", None)
    switch = before == "eager" and callable(getattr(model, "set_attn_implementation", None))
    if switch:
        try:
            model.set_attn_implementation("sdpa")
        except (ValueError, ImportError, AttributeError):  # a model without an SDPA path stays eager
            switch = False
    try:
        with eager_experts(model), upcast(model, dtype, inputs):
            yield
    finally:
        if switch:
            model.set_attn_implementation(before)


factory.usage = USAGE
factory.requires = {"transformers": "parity[hf]"}  # checked before the factory runs; `parity backends` says so
