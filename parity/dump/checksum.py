"""CRC-32 of tap data (zlib's polynomial, as stored in dumps' `crc32` attributes).

Every byte of a dump is checksummed when written and when read, so the CRC runs at the
speed of the data: zlib's runs at ~2 GB/s on our 2-core CPU, as slow as the disk, while
ISA-L's (the `isal` package, a dependency; carry-less multiply) runs at ~10 GB/s.  Both
give the same value; zlib is the fallback where isal is not installed.  Both release the
GIL for large buffers, so a reader thread's checksum overlaps the diff's arithmetic.
"""

from __future__ import annotations

try:
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is a dependency; zlib gives the same value
    from zlib import crc32


__all__ = ["crc32"]
