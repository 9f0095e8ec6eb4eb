"""The node's stage cache keeps a file only if it is exactly what was announced."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from splitexit.errors import IntegrityError, WireError
from splitexit.runtime.stage_cache import MAX_STAGE_BYTES, StageCache


def upload(cache: StageCache, chunks: list[tuple[str, int, bytes]]) -> tuple[str, int]:
    async def stream():  # noqa: ANN202
        for chunk in chunks:
            yield chunk

    return asyncio.run(cache.store(stream()))


def pieces(data: bytes, sha: str | None = None, size: int | None = None) -> list[tuple[str, int, bytes]]:
    sha = sha or hashlib.sha256(data).hexdigest()
    return [(sha, len(data) if size is None else size, data[i:i + 7]) for i in range(0, len(data), 7)]


def test_a_complete_upload_is_kept_under_its_sha256(tmp_path: Path) -> None:
    cache = StageCache(tmp_path)
    data = b"stage weights" * 10
    sha, size = upload(cache, pieces(data))
    assert cache.has(sha) and cache.read(sha) == data and size == len(data) and cache.shas() == [sha]
    assert StageCache(tmp_path).has(sha), "a restarted node finds its stages again"


@pytest.mark.parametrize("case, error", [
    ("altered", IntegrityError), ("short", IntegrityError), ("long", WireError), ("mixed", WireError),
    ("huge", WireError), ("not a sha", WireError)])
def test_a_bad_upload_leaves_nothing_behind(tmp_path: Path, case: str, error: type) -> None:
    cache = StageCache(tmp_path)
    data = b"stage weights" * 10
    chunks = {
        "altered": pieces(data[:-1] + b"X", sha=hashlib.sha256(data).hexdigest()),
        "short": pieces(data, size=len(data) + 1),
        "long": pieces(data, size=len(data) - 1),
        "mixed": pieces(data)[:1] + [("0" * 64, len(data), b"x")],
        "huge": pieces(data, size=MAX_STAGE_BYTES + 1),
        "not a sha": pieces(data, sha="../../etc/passwd"),
    }[case]
    with pytest.raises(error):
        upload(cache, chunks)
    assert list(tmp_path.iterdir()) == [], "no partial or temporary file may stay"


def test_a_digest_with_a_trailing_newline_is_not_a_digest(tmp_path: Path) -> None:
    """A `$`-anchored pattern matches before a final newline; the cache takes whole digests only."""
    cache = StageCache(tmp_path)
    data = b"stage weights"
    sha = hashlib.sha256(data).hexdigest()
    upload(cache, pieces(data))
    assert cache.has(sha) and not cache.has(sha + "\n")
    with pytest.raises(WireError):
        upload(StageCache(tmp_path / "other"), pieces(data, sha=sha + "\n"))
