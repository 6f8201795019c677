"""The disk's own pace, the floor a dump write is compared against."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np


def raw_write_seconds(path: Path, nbytes: int) -> float:
    """Seconds of a plain sequential write + fsync of nbytes of incompressible data."""
    block = np.random.default_rng(1).integers(0, 255, 8 << 20, dtype=np.uint8).tobytes()
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0
