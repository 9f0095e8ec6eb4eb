"""Stage files a node has received, on disk and named by their sha256, so each crosses the network once.

A file is written through a temporary name while its chunks arrive, hashed on the way, and kept only if
its size and sha256 are the ones announced; a restarted node finds its stages again and is not re-sent
them.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from splitexit.errors import IntegrityError, WireError

__all__ = ["MAX_STAGE_BYTES", "StageCache", "default_cache_dir"]

#: Largest stage file a node accepts (a whole ViT-L is ~1.2 GB).
MAX_STAGE_BYTES = 4 << 30
_SHA256 = re.compile(r"[0-9a-f]{64}")  # whole names only (fullmatch): `$` would let "…\n" in


def default_cache_dir(node: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "splitexit" / "stages" / node


class StageCache:
    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.directory / f"{sha256}.stage"

    def has(self, sha256: str) -> bool:
        return bool(_SHA256.fullmatch(sha256)) and self.path(sha256).is_file()

    def shas(self) -> list[str]:
        return sorted(p.stem for p in self.directory.glob("*.stage") if _SHA256.fullmatch(p.stem))

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    async def store(self, chunks: AsyncIterator[tuple[str, int, bytes]]) -> tuple[str, int]:
        """Write a stage from ``(sha256, total_size, data)`` chunks; return its sha256 and size once verified."""
        digest = hashlib.sha256()
        expected: tuple[str, int] | None = None
        size = 0
        fd, name = tempfile.mkstemp(prefix=".incoming.", dir=self.directory)
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as handle:
                async for sha256, total, data in chunks:
                    if expected is None:
                        if not _SHA256.fullmatch(sha256) or not 0 < total <= MAX_STAGE_BYTES:
                            raise WireError(f"a stage file needs a sha256 and a size of 1 to {MAX_STAGE_BYTES} bytes, "
                                            f"got {sha256[:70]!r} and {total}", code="bad_message")
                        expected = (sha256, total)
                    elif (sha256, total) != expected:
                        raise WireError("the chunks of one stage file must all name the same sha256 and size",
                                        code="bad_message")
                    size += len(data)
                    if size > expected[1]:
                        raise WireError(f"stage file {sha256[:12]}… is larger than the {expected[1]} bytes announced",
                                        code="too_large")
                    digest.update(data)
                    handle.write(data)
            if expected is None:
                raise WireError("an empty stage upload", code="bad_message")
            if size != expected[1] or digest.hexdigest() != expected[0]:
                raise IntegrityError(f"stage file {expected[0][:12]}… arrived with {size} bytes and sha256 "
                                     f"{digest.hexdigest()[:12]}…: corrupted in transit; refused")
            os.replace(tmp, self.path(expected[0]))
            return expected
        finally:
            tmp.unlink(missing_ok=True)
