"""Byte coders of the artifact: zstd, brotli and (only when the program is on PATH) lrzip.

Every coded blob says what it is by its first bytes, so `decode` needs no side information:
zstd frames start with their own magic (28 b5 2f fd), lrzip files with b"LRZI", and brotli, which
has no magic, is written after the 4-byte magic of brotli's framing format (ce b2 cf 81).
"""
import os
import shutil
import subprocess
import tempfile

import brotli
import zstandard

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
BROTLI_MAGIC = b"\xce\xb2\xcf\x81"
LRZIP_MAGIC = b"LRZI"
BROTLI_QUALITY, BROTLI_LGWIN = 11, 24
CODERS = ("zstd", "brotli", "lrzip")


class CoderMissing(RuntimeError):
    """A coder was asked for that this machine does not have (lrzip off PATH)."""


def lrzip_available() -> bool:
    return shutil.which("lrzip") is not None


def encode(raw: bytes, coder: str, *, zstd_level: int = 22) -> bytes:
    """raw coded with `coder` (zstd at zstd_level, brotli q11 window 2^24, or lrzip -z -L 9: ZPAQ)."""
    if coder == "zstd":
        return zstandard.ZstdCompressor(level=zstd_level, write_checksum=True, write_content_size=True).compress(raw)
    if coder == "brotli":
        return BROTLI_MAGIC + brotli.compress(raw, quality=BROTLI_QUALITY, lgwin=BROTLI_LGWIN)
    if coder == "lrzip":
        return _lrzip(raw, ["-z", "-L", "9"])
    raise ValueError(f"unknown coder {coder!r}; use one of {', '.join(CODERS)}")


def decode(blob: bytes) -> bytes:
    """The raw bytes of a blob `encode` wrote; ValueError (one sentence) when it is not one."""
    if blob.startswith(ZSTD_MAGIC):
        try:
            return zstandard.ZstdDecompressor().decompress(blob)
        except zstandard.ZstdError as error:
            raise ValueError(f"it is not a complete zstd frame with its size recorded ({error})") from None
    if blob.startswith(BROTLI_MAGIC):
        try:
            return brotli.decompress(blob[len(BROTLI_MAGIC):])
        except brotli.error as error:
            raise ValueError(f"its brotli stream is damaged or truncated ({error})") from None
    if blob.startswith(LRZIP_MAGIC):
        return _lrzip(blob, ["-d"])
    raise ValueError("it starts with no known coder's magic (zstd, brotli, lrzip)")


def _lrzip(data: bytes, args: list[str]) -> bytes:
    """Run the lrzip program on data through temp files (it does not stream) -> its output bytes."""
    if not lrzip_available():
        raise CoderMissing("lrzip is not on PATH: install it (apt-get install lrzip) or use the brotli or zstd group coder")
    with tempfile.TemporaryDirectory(prefix="golf-lrzip-") as folder:
        source = os.path.join(folder, "in.lrz" if "-d" in args else "in")
        target = os.path.join(folder, "out")
        with open(source, "wb") as f:
            f.write(data)
        result = subprocess.run(["lrzip", "-q", "-f", *args, "-o", target, source], capture_output=True)
        if result.returncode != 0:
            raise ValueError(f"lrzip {' '.join(args)} failed: {result.stderr.decode(errors='replace').strip()}")
        with open(target, "rb") as f:
            return f.read()
