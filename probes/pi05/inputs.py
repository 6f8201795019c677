"""Deterministic synthetic observations and flow-matching noise from a seed.

Both backends of a comparison get the very same tensors (noise included); the
fingerprint lets a diff of two dumps prove it."""
from __future__ import annotations

import hashlib

import torch

from parity.probes.pi05.config import Pi05Config
from parity.probes.pi05.model import Observation

BOS = 2


def make_observation(cfg: Pi05Config, seed: int, batch: int = 1, frame: int = 0) -> Observation:
    """Frame 0 is the observation of `seed`; later frames keep its prompt and draw new
    images and state, as a robot's camera stream would."""
    gen = torch.Generator().manual_seed(seed + 1_000_003)
    S, C = cfg.vision.image_size, len(cfg.cameras)
    # smooth-ish images in [-1, 1]: random low-resolution pattern upsampled
    low = torch.rand(batch * C, 3, 8, 8, generator=gen) * 2 - 1  # frame 0's, drawn always: the prompt stays put
    frame_gen = torch.Generator().manual_seed(seed + 3_000_017 + 7919 * frame) if frame else None
    if frame_gen is not None:
        low = torch.rand(batch * C, 3, 8, 8, generator=frame_gen) * 2 - 1
    images = torch.nn.functional.interpolate(low, size=(S, S), mode="bilinear", align_corners=False)
    images = images.reshape(batch, C, 3, S, S)
    image_masks = torch.tensor([c not in cfg.masked_cameras for c in cfg.cameras]).expand(batch, C).clone()
    images[~image_masks] = 0.0  # a missing camera is a black image, masked out
    L = cfg.max_token_len
    lengths = torch.randint(max(2, L // 4), max(3, (3 * L) // 4) + 1, (batch,), generator=gen)
    tokens = torch.randint(3, cfg.vocab_size, (batch, L), generator=gen)
    token_mask = torch.arange(L)[None, :] < lengths[:, None]
    tokens[:, 0] = BOS
    tokens[~token_mask] = 0  # PAD
    state = torch.rand(batch, cfg.action_dim, generator=gen) * 2 - 1
    if frame_gen is not None:
        state = torch.rand(batch, cfg.action_dim, generator=frame_gen) * 2 - 1
    return Observation(images, image_masks, tokens, token_mask, state)


def make_noise(cfg: Pi05Config, seed: int, batch: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 2_000_003)
    return torch.randn(batch, cfg.action_horizon, cfg.action_dim, generator=gen)


def fingerprint(obs: Observation, noise: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (*(getattr(obs, f) for f in obs.__dataclass_fields__), noise):
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
    return h.hexdigest()[:16]
