"""The catalogue of injectable bugs: each one a real bug class seen in fast backends.

A fault is a name a candidate is built with; the code that a fault changes checks
`faults.has(NAME)` at exactly the one place the bug would live.
"""
from __future__ import annotations

from dataclasses import dataclass

CATALOGUE: dict[str, str] = {
    "nomask": "attention ignores the padding / masked-camera mask (flash_attn_func takes no mask)",
    "silu": "Gemma MLP gated with SiLU (SwiGLU) instead of GELU-tanh (GeGLU)",
    "dtype": "MLP hidden activation produced in float16 and fed to a bf16/fp32 down-projection: raises",
    "norm_plain_w": "Gemma RMSNorm scales by w instead of (1 + w)",
    "rope_interleaved": "RoPE pairs interleaved channels (GPT-J style) instead of the half-split rotate_half",
    "kv_mutate": "prefix K/V cache updated in place by each denoise step, so later steps attend to stale suffix keys",
    "kv_reuse": "prefix K/V cache reused for 2 frames (recomputed on even frames only) to save time",
    "stale_vision": "vision tokens never refreshed: every frame sees frame 0's images",
    "mid_norm": "only the middle prefix layer's input RMSNorm (layer depth // 2) scales by w instead of (1 + w)",
    "rope_base": "RoPE tables built with base 1e6 instead of 1e4 (a config copied from another model)",
    "attn_scale": "attention logits scaled by 1 / head_dim instead of 1 / sqrt(head_dim)",
}


@dataclass(frozen=True)
class Faults:
    names: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, names) -> Faults:
        names = frozenset(n.strip() for n in (names or ()) if n.strip())
        unknown = sorted(names - CATALOGUE.keys())
        if unknown:
            raise ValueError(f"unknown fault {', '.join(unknown)}; known: {', '.join(CATALOGUE)}")
        return cls(names)

    def has(self, name: str) -> bool:
        if name not in CATALOGUE:
            raise ValueError(f"fault {name!r} is not in the catalogue")
        return name in self.names

    def __bool__(self) -> bool:
        return bool(self.names)
