"""Candidate backends a practitioner brings, written the way you would write your own: the
`hf` backend's model, changed by a library after it loads.  Each factory is a spec
`candidates:NAME:PATH[@opts]` (run from this folder, or put it on your PYTHONPATH):

    parity diff --ref 'hf:../reports/tiny-llama' --cand 'candidates:torchao_int8:../reports/tiny-llama'
    parity weights --ref 'hf:../reports/tiny-llama' --cand 'candidates:quanto_int8:../reports/tiny-llama'
    parity diff --ref 'hf:../reports/tiny-llama' --cand 'candidates:compiled:../reports/tiny-llama'
    parity diff --ref 'hf:M@attn=eager' --cand 'candidates:liger:M' --device cuda   # liger-kernel: a GPU

A missing library is one line (parity checks `requires` before the factory runs).  A
quantised candidate is lossy on purpose, so it says where and by how much (`Backend.lossy`):
with no bounds given, its taps are judged by that allowance from its first quantised layer
on, and by calibrated budgets before it.  Its weights are judged by `parity weights
--quantized-min-cos`.
"""
from __future__ import annotations

import warnings

from parity.taps.backends import Lossy

# Every Linear of the decoder is quantised: its outputs, and all that follows, carry the loss.
LINEARS = ("decoder.*.q", "decoder.*.k", "decoder.*.v", "decoder.*.o_proj", "decoder.*.mlp", "output.logits")


def _int8(backend, how: str, min_cos: float = 0.999):
    """Declare an int8 candidate's allowance.  Measured on the tiny Llama: weight-only int8
    keeps every tap above cos 0.9999, so 0.999 leaves room for wider models; int8
    activations too (torch.ao dynamic) reach 0.9990, so that one declares 0.995."""
    backend.lossy = Lossy(parts=LINEARS, bounds={"*": min_cos}, why=f"{how} Linear layers")
    backend.meta["quantized"] = how
    return backend


def _hf(options, arg: str):
    from parity.probes.hf.backend import factory

    return factory(options, arg)


def torchao_int8(options, arg: str):
    """the hf model with torchao int8 weight-only Linear layers (quantize_ + Int8WeightOnlyConfig)"""
    import torchao.quantization as Q

    backend = _hf(options, arg)
    Q.quantize_(backend.model, Q.Int8WeightOnlyConfig())
    return _int8(backend, "torchao int8 weight-only")


def quanto_int8(options, arg: str):
    """the hf model with optimum-quanto qint8 weights, frozen"""
    from optimum import quanto

    backend = _hf(options, arg)
    quanto.quantize(backend.model, weights=quanto.qint8)
    quanto.freeze(backend.model)
    return _int8(backend, "optimum-quanto qint8")


def dynamic_int8(options, arg: str):
    """the hf model with torch.ao dynamic int8 Linear layers (quantize_dynamic)"""
    import torch

    backend = _hf(options, arg)
    if next(backend.model.parameters()).device.type != "cpu":
        raise ValueError("torch.ao dynamic quantisation runs on the CPU only: give --device cpu")
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated, and still in torch
        warnings.simplefilter("ignore")
        torch.ao.quantization.quantize_dynamic(backend.model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    return _int8(backend, "torch.ao dynamic qint8 (weights and activations)", 0.995)


def compiled(options, arg: str):
    """the hf model run through torch.compile (inductor on a GPU, the eager backend on a CPU)"""
    import torch

    backend = _hf(options, arg)
    device = next(backend.model.parameters()).device
    call = torch.compile(backend.model, backend="inductor" if device.type == "cuda" else "eager")
    inputs = backend.inputs

    def run():
        with torch.no_grad():
            return call(**inputs)

    backend.run = run
    backend.meta["compile"] = "inductor" if device.type == "cuda" else "eager"
    return backend


def liger(options, arg: str):
    """the hf Llama with liger-kernel's fused Triton kernels (RMSNorm, RoPE, SwiGLU; a CUDA GPU)"""
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    backend = _hf(options, arg)
    # patches this model instance and transformers' module-level functions: parity runs the
    # reference to completion before it builds this candidate, so the reference is untouched
    apply_liger_kernel_to_llama(model=backend.model)
    backend.meta["kernels"] = "liger-kernel"
    return backend


torchao_int8.requires = {"torchao": "torchao"}
quanto_int8.requires = {"optimum.quanto": "optimum-quanto"}
liger.requires = {"liger_kernel": "liger-kernel"}
