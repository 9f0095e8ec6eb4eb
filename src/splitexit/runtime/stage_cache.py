"""Stage files a node has received, on disk and named by their sha256, so each crosses the network once.

A file is written through a temporary name while its chunks arrive, hashed on the way, and kept only if
its size and sha256 are the ones announced; a restarted node finds its stages again and is not re-sent
them. One upload at a time, only if the disk has room for it; past ``max_bytes`` the least recently used
files go, never one the node is serving (``pinned``).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Collection
from pathlib import Path

from splitexit.errors import IntegrityError, WireError

__all__ = ["CACHE_BYTES", "FREE_RESERVE", "MAX_STAGE_BYTES", "StageCache", "default_cache_dir"]

#: Largest stage file a node accepts (a whole ViT-L is ~1.2 GB).
MAX_STAGE_BYTES = 2 << 30
#: Bytes of stage files a node keeps on disk before it evicts the least recently used ones.
CACHE_BYTES = 8 << 30
#: Bytes an upload must leave free on the cache's disk.
FREE_RESERVE = 256 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")  # whole names only (fullmatch): `$` would let "…\n" in


def default_cache_dir(node: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "splitexit" / "stages" / node


class StageCache:
    def __init__(self, directory: Path, *, max_bytes: int = CACHE_BYTES,
                 pinned: Callable[[], Collection[str]] = frozenset):
        """``pinned`` names the files in use, which eviction keeps whatever their age."""
        self.directory, self.max_bytes, self.pinned = directory, max_bytes, pinned
        self._storing = False
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.directory / f"{sha256}.stage"

    def has(self, sha256: str) -> bool:
        return bool(_SHA256.fullmatch(sha256)) and self.path(sha256).is_file()

    def shas(self) -> list[str]:
        return sorted(p.stem for p in self.directory.glob("*.stage") if _SHA256.fullmatch(p.stem))

    def read(self, sha256: str) -> bytes:
        path = self.path(sha256)
        data = path.read_bytes()
        os.utime(path)  # used now: the last to be evicted
        return data

    async def store(self, chunks: AsyncIterator[tuple[str, int, bytes]]) -> tuple[str, int]:
        """Write a stage from ``(sha256, total_size, data)`` chunks; return its sha256 and size once verified."""
        if self._storing:
            raise WireError("another stage upload to this node is under way; send this one after it", code="busy")
        self._storing = True
        try:
            stored = await self._store(chunks)
        finally:
            self._storing = False
        self._evict(keep={stored[0]})
        return stored

    async def _store(self, chunks: AsyncIterator[tuple[str, int, bytes]]) -> tuple[str, int]:
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
                        free = shutil.disk_usage(self.directory).free
                        if total > free - FREE_RESERVE:
                            raise WireError(f"no room for a {total}-byte stage file: {free} bytes free in "
                                            f"{self.directory}", code="too_large")
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

    def _evict(self, *, keep: Collection[str]) -> None:
        """Delete the least recently used files until the cache is within ``max_bytes`` (pinned ones stay)."""
        files = sorted(((p.stat(), p) for p in self.directory.glob("*.stage") if _SHA256.fullmatch(p.stem)),
                       key=lambda entry: entry[0].st_mtime)  # one stat per file
        total = sum(stat.st_size for stat, _ in files)
        protected = {*keep, *self.pinned()}
        for stat, path in files:
            if total <= self.max_bytes:
                return
            if path.stem not in protected:
                total -= stat.st_size
                path.unlink(missing_ok=True)
