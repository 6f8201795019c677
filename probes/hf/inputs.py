"""Model inputs for `hf` backends: token rows from a file or from the seed, padded left
or right, and the token layout that makes padding don't-care.

Inputs are kept as *valid token rows* (ragged) plus optional pixel values; padding is
applied per backend, so a left-padded run and a right-padded run of the same prompts
have the same fingerprint and compare position by position.  Canonical position of a
token = its index among its row's valid tokens.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from parity.taps.records import Layout, Region

DEFAULT_SEQ_LEN = 16
INT64_MAX = np.iinfo(np.int64).max
FORMATS = ("a .json list of token ids, list of lists, or {input_ids, attention_mask}; "
           "a .npy int array [rows, tokens] (negative = padding) or float array [rows, 3, H, W] of pixels")


@dataclass(frozen=True)
class Prompts:
    """What both sides of a comparison feed the model, before padding."""

    rows: tuple[tuple[int, ...], ...]  # valid token ids per row; () for image-only models
    pixels: np.ndarray | None  # [rows, channels, H, W] float32, or None
    source: str  # "seed N" or the file it came from

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([list(r) for r in self.rows]).encode())
        if self.pixels is not None:
            h.update(str(self.pixels.shape).encode())
            h.update(np.ascontiguousarray(self.pixels, dtype=np.float32).tobytes())
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class Batch:
    """Padded arrays ready for the model (numpy; the backend moves them to torch)."""

    input_ids: np.ndarray | None  # [B, S] int64
    attention_mask: np.ndarray | None  # [B, S] int64, 1 = token, 0 = padding
    position_ids: np.ndarray | None  # [B, S] int64, counted over valid tokens only
    pixels: np.ndarray | None
    starts: tuple[int, ...]  # first valid slot per row


def _rows_from_mask(ids: np.ndarray, mask: np.ndarray, what: str) -> list[list[int]]:
    if ids.shape != mask.shape:
        raise ValueError(f"{what}: input_ids {ids.shape} and attention_mask {mask.shape} differ in shape")
    rows = []
    for i, (r, m) in enumerate(zip(ids, mask, strict=True)):
        valid = np.flatnonzero(m)
        if valid.size and valid[-1] - valid[0] + 1 != valid.size:
            raise ValueError(f"{what}: row {i} has padding in the middle (only left or right padding is supported)")
        rows.append([int(t) for t in r[valid]])
    return rows


def _as_rows(value: Any, what: str) -> tuple[list[list[int]], np.ndarray | None]:
    """Token rows and/or pixels from any accepted in-memory form."""
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        value = value.detach().cpu().numpy()
    if isinstance(value, dict):
        if "input_ids" not in value and "pixel_values" not in value:
            raise ValueError(f"{what}: a dict needs input_ids (and optionally attention_mask, pixel_values)")
        pixels = None
        if value.get("pixel_values") is not None:
            pixels = np.asarray(value["pixel_values"], dtype=np.float32)
        if value.get("input_ids") is None:
            return [], pixels
        if value.get("attention_mask") is not None:
            ids = np.atleast_2d(np.asarray(value["input_ids"]))
            if ids.dtype.kind not in "iu":
                raise ValueError(f"{what}: input_ids must be integer token ids, got {ids.dtype} {ids.shape}")
            return _rows_from_mask(ids, np.atleast_2d(np.asarray(value["attention_mask"])), what), pixels
        rows, _ = _as_rows(value["input_ids"], what)
        return rows, pixels
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f":
            if value.ndim != 4:
                raise ValueError(f"{what}: a float array must be pixels [rows, channels, H, W], got {value.shape}")
            return [], value.astype(np.float32)
        if value.dtype.kind not in "iu" or value.ndim not in (1, 2):
            raise ValueError(f"{what}: expected token ids [rows, tokens] of integers, got {value.dtype} {value.shape}")
        if value.dtype.kind == "u" and value.size and int(value.max()) > INT64_MAX:  # would wrap to "padding"
            raise ValueError(f"{what}: token id {int(value.max())} does not fit in int64 (ids are below 2**63)")
        ids = np.atleast_2d(value).astype(np.int64)
        return _rows_from_mask(ids, ids >= 0, what), None
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{what}: no tokens")
        if all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in value):
            return [[int(t) for t in value]], None
        if all(isinstance(r, (list, tuple)) for r in value):
            rows = []
            for i, r in enumerate(value):
                if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in r):
                    raise ValueError(f"{what}: row {i} holds something other than integer token ids")
                rows.append([int(t) for t in r])
            return rows, None
    raise ValueError(f"{what}: cannot read inputs from {type(value).__name__}; expected {FORMATS}")


def _load_npy(path: Path) -> np.ndarray:
    """A .npy file's array (never unpickled), its header checked against the file first:
    a header may declare more elements than the file holds, or than any memory does."""
    fmt = np.lib.format
    with path.open("rb") as f:
        version = fmt.read_magic(f)
        read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"npy format version {version[0]}.{version[1]} is not supported (1.0 and 2.0 are)")
        shape, _, dtype = read(f)
        held = path.stat().st_size - f.tell()
    count = math.prod(shape)
    if count * dtype.itemsize > held:
        raise ValueError(f"its header declares {count} elements of {dtype} {shape}, {count * dtype.itemsize} bytes, "
                         f"but the file holds {held}")
    return np.load(path, allow_pickle=False)


def read_inputs(source: Any) -> tuple[list[list[int]], np.ndarray | None, str]:
    """(token rows, pixels, description) from a path (.json / .npy) or an in-memory value;
    ValueError for one that holds neither (never replaced by generated inputs)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"input file {path} does not exist")
        try:
            if path.suffix == ".json":
                value = json.loads(path.read_text())
            elif path.suffix == ".npy":
                value = _load_npy(path)
            else:
                raise ValueError(f"{path}: unknown input format {path.suffix!r}; expected {FORMATS}")
        except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"cannot read {path}: {exc}") from None
        except RecursionError:
            raise ValueError(f"cannot read {path}: nested too deeply to be inputs") from None
        what = described = str(path)
    else:
        value, what, described = source, "inputs", "given"
    rows, pixels = _as_rows(value, what)
    if not rows and pixels is None:
        raise ValueError(f"{what}: no token ids and no pixels (empty inputs are not replaced by generated ones: "
                         "leave out --input for those)")
    if pixels is not None and pixels.shape[0] == 0:
        raise ValueError(f"{what}: no images (pixels of shape {pixels.shape})")
    return rows, pixels, described


def check_rows(rows: list[list[int]], vocab_size: int, what: str) -> None:
    for i, r in enumerate(rows):
        if not r:
            raise ValueError(f"{what}: row {i} has no tokens")
        bad = [t for t in r if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{what}: row {i} has token id {bad[0]} outside the vocabulary [0, {vocab_size})")


def check_positions(tokens: int, positions: int | None, offset: int, what: str) -> None:
    """A row of `tokens` tokens, its position ids counted from `offset`, must fit the
    `positions` the model declares (max_position_embeddings; None: it declares none)."""
    if isinstance(positions, int) and tokens + offset > positions:
        raise ValueError(f"{what}: {tokens} tokens{f' from position {offset}' if offset else ''}, more than the "
                         f"{positions} positions the model declares (max_position_embeddings)")


def generate_rows(seed: int, batch: int, seq_len: int, vocab_size: int, prefix: tuple[int, ...] = (),
                  avoid: tuple[int, ...] = ()) -> list[list[int]]:
    """Random prompts: row 0 fills seq_len, the others are shorter (so padding shows).
    `prefix` starts every row (PaliGemma's image tokens + BOS); `avoid` ids never appear
    in the random part (padding, image token)."""
    rng = np.random.default_rng(seed + 3_000_017)
    free = seq_len - len(prefix)
    if free < 1:
        raise ValueError(f"seq_len {seq_len} leaves no room after the {len(prefix)} fixed prefix tokens")
    allowed = np.setdiff1d(np.arange(min(3, vocab_size - 1), vocab_size), np.asarray(avoid, dtype=np.int64))
    if allowed.size == 0:
        raise ValueError("no token ids left to draw from")
    rows = []
    for b in range(batch):
        n = free if b == 0 else int(rng.integers(max(1, free // 2), free + 1))
        rows.append(list(prefix) + [int(t) for t in rng.choice(allowed, size=n)])
    return rows


def generate_pixels(seed: int, batch: int, channels: int, size: int) -> np.ndarray:
    """Smooth random images in [-1, 1]: a random 4x4 pattern, repeated up to size."""
    rng = np.random.default_rng(seed + 4_000_037)
    low = rng.uniform(-1, 1, size=(batch, channels, 4, 4)).astype(np.float32)
    reps = -(-size // 4)
    return np.kron(low, np.ones((reps, reps), dtype=np.float32))[..., :size, :size]


def pad(prompts: Prompts, side: str, pad_id: int, position_offset: int = 0) -> Batch:
    if not prompts.rows:
        return Batch(None, None, None, prompts.pixels, ())
    S = max(len(r) for r in prompts.rows)
    B = len(prompts.rows)
    ids = np.full((B, S), pad_id, dtype=np.int64)
    mask = np.zeros((B, S), dtype=np.int64)
    pos = np.zeros((B, S), dtype=np.int64)
    starts = []
    for b, r in enumerate(prompts.rows):
        start = S - len(r) if side == "left" else 0
        ids[b, start:start + len(r)] = r
        mask[b, start:start + len(r)] = 1
        pos[b, start:start + len(r)] = np.arange(len(r)) + position_offset
        starts.append(start)
    return Batch(ids, mask, pos, prompts.pixels, tuple(starts))


def token_layout(prompts: Prompts, batch: Batch, regions: tuple[Region, ...] = ()) -> Layout:
    """Slot (b, s) -> canonical b * S + (s - start_b); padding slots are -1 (never compared)."""
    B, S = batch.input_ids.shape
    slots = np.full((B, S), -1, dtype=np.int64)
    for b, (r, start) in enumerate(zip(prompts.rows, batch.starts, strict=True)):
        slots[b, start:start + len(r)] = b * S + np.arange(len(r))
    return Layout(slots, S, regions)
