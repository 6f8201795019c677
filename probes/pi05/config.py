"""pi0.5 sizes (tiny for CPU tests, full = openpi's real sizes) and the rounding policy.

Rounding choices of the reference, stated once (openpi's PyTorch port is the model; the
README's table sets them beside JAX's):
- Linear layers of SigLIP, the projector and both Gemma stacks run in `dtype` (bf16 by
  default), weights stored in `dtype`.
- Patch and position embedding, every norm (statistics, scale, adaRMS dense) and the
  top-level action_in/out projections and time MLP run in float32; norm outputs are cast
  back to `dtype`.
- Attention: logits q.k^T in `dtype`, then times head_dim^-0.5 (HF eager order; exact for
  Gemma's 1/16, rounded for SigLIP's 72^-0.5), additive mask and softmax in float32,
  probabilities cast to `dtype` before .v.
- RoPE: cos/sin and the rotation in float32, cast once to `dtype` (JAX's choice, the one
  departure from openpi PyTorch, which rotates in bf16).
- Text embedding times sqrt(width) as a Python float, rounded once to `dtype`.
- Time embedding in float64, cast once to float32 (openpi PyTorch).
- Flow-matching state x_t, the noise, dt and t stay float32; t accumulates in float32.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

# Flow-matching steps: openpi and lerobot take 10; each step is one more run of the action
# expert (and one more set of its taps), so a config.json asking for millions is refused.
MAX_NUM_STEPS = 100
# RoPE positions the Gemma stacks declare (PaliGemma's max_position_embeddings): the prompt,
# the image tokens and the action horizon share them.
MAX_POSITIONS = 8192


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _positive(config, names: tuple[str, ...] | None = None, what: str = "") -> None:
    """The size fields `names` (None: every field) are integers of 1 or more; checked first,
    as the other checks divide by them."""
    for name in names or tuple(f.name for f in fields(config)):
        value = getattr(config, name)
        _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"{what}{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class VisionConfig:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int
    image_size: int

    def __post_init__(self) -> None:
        _positive(self, what="vision ")
        _require(self.width % self.num_heads == 0, "vision width must divide into heads")
        _require(self.image_size % self.patch_size == 0, "image size must be a multiple of the patch")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class GemmaConfig:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        _positive(self, what="gemma ")
        _require(self.num_heads % self.num_kv_heads == 0, "query heads must be a multiple of kv heads")


@dataclass(frozen=True)
class Pi05Config:
    name: str
    vision: VisionConfig
    llm: GemmaConfig  # expert 0: the prefix LLM (PaliGemma's Gemma)
    expert: GemmaConfig  # expert 1: the action expert
    vocab_size: int
    max_token_len: int
    action_dim: int = 32
    action_horizon: int = 50
    num_steps: int = 10
    cameras: tuple[str, ...] = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
    masked_cameras: tuple[str, ...] = ("right_wrist_0_rgb",)  # LIBERO / DROID
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    max_positions: int = MAX_POSITIONS  # RoPE positions: prefix_len + action_horizon must fit

    def __post_init__(self) -> None:
        _positive(self, ("vocab_size", "max_token_len", "action_dim", "action_horizon", "num_steps", "max_positions"))
        _require(self.llm.depth == self.expert.depth, "both experts must share depth")
        for f in ("num_heads", "num_kv_heads", "head_dim"):
            _require(getattr(self.llm, f) == getattr(self.expert, f), f"both experts must share {f}")
        _require(self.llm.head_dim % 2 == 0, "RoPE needs an even head_dim")
        _require(set(self.masked_cameras) <= set(self.cameras), "masked cameras must be cameras")
        _require(self.num_steps <= MAX_NUM_STEPS,
                 f"num_steps {self.num_steps} is more than {MAX_NUM_STEPS} flow-matching steps (openpi takes 10)")
        used = self.prefix_len + self.action_horizon
        _require(used <= self.max_positions,
                 f"max_token_len {self.max_token_len} + {len(self.cameras)} cameras' {self.vision.num_tokens} image "
                 f"tokens + action_horizon {self.action_horizon} = {used} positions, more than the "
                 f"{self.max_positions} the model declares")

    @property
    def prefix_len(self) -> int:
        return len(self.cameras) * self.vision.num_tokens + self.max_token_len


TINY = Pi05Config(
    name="tiny",
    vision=VisionConfig(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=14, image_size=56),
    llm=GemmaConfig(width=64, depth=4, mlp_dim=128, num_heads=2, num_kv_heads=1, head_dim=16),
    expert=GemmaConfig(width=32, depth=4, mlp_dim=64, num_heads=2, num_kv_heads=1, head_dim=16),
    vocab_size=512,
    max_token_len=16,
    action_horizon=10,
)

FULL = Pi05Config(
    name="full",
    vision=VisionConfig(width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=14, image_size=224),
    llm=GemmaConfig(width=2048, depth=18, mlp_dim=16384, num_heads=8, num_kv_heads=1, head_dim=256),
    expert=GemmaConfig(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256),
    vocab_size=257152,
    max_token_len=200,
    action_horizon=50,
)

CONFIGS = {c.name: c for c in (TINY, FULL)}


def get_config(name: str, **overrides) -> Pi05Config:
    if name not in CONFIGS:
        raise ValueError(f"unknown pi0.5 config {name!r}; known: {', '.join(CONFIGS)}")
    return replace(CONFIGS[name], **overrides) if overrides else CONFIGS[name]
