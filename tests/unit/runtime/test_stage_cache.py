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


def test_a_second_upload_while_one_is_under_way_is_refused_busy(tmp_path: Path) -> None:
    cache = StageCache(tmp_path)
    data = b"stage weights" * 10

    async def main() -> tuple[str, int]:
        started, go_on = asyncio.Event(), asyncio.Event()

        async def slow():  # noqa: ANN202
            for i, chunk in enumerate(pieces(data)):
                yield chunk
                if i == 0:
                    started.set()
                    await go_on.wait()

        first = asyncio.get_running_loop().create_task(cache.store(slow()))
        await started.wait()
        with pytest.raises(WireError) as refused:
            await cache.store(aiter_of(pieces(b"other")))
        assert refused.value.code == "busy"
        go_on.set()
        return await first

    sha, _ = asyncio.run(main())
    assert cache.shas() == [sha], "the upload under way completed; the refused one left nothing"


def test_an_upload_larger_than_the_free_space_is_refused_before_writing(tmp_path: Path) -> None:
    """On a real 8 MiB tmpfs: a 1 MiB upload would leave less than FREE_RESERVE free."""
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)], check=True)
    try:
        cache = StageCache(small)
        with pytest.raises(WireError, match="no room"):
            upload(cache, [("a" * 64, 1 << 20, b"x")])
        assert cache.shas() == [] and not list(small.iterdir())
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_past_its_size_bound_the_cache_evicts_the_least_recently_used_unpinned_files(tmp_path: Path) -> None:
    import os

    blobs = [bytes([i]) * 100 for i in range(4)]
    shas = [hashlib.sha256(b).hexdigest() for b in blobs]
    cache = StageCache(tmp_path, max_bytes=250, pinned=lambda: {shas[0]})
    for i, blob in enumerate(blobs[:2]):
        upload(cache, pieces(blob))
        os.utime(cache.path(shas[i]), (1000 + i, 1000 + i))  # distinct ages: 0 oldest
    upload(cache, pieces(blobs[2]))  # 300 bytes: the oldest unpinned one (1) goes, pinned 0 stays
    assert sorted(cache.shas()) == sorted([shas[0], shas[2]])
    cache.read(shas[0])
    upload(cache, pieces(blobs[3]))
    assert sorted(cache.shas()) == sorted([shas[0], shas[3]]), "2 was the least recently used unpinned file"


def aiter_of(chunks: list[tuple[str, int, bytes]]):  # noqa: ANN201
    async def stream():  # noqa: ANN202
        for chunk in chunks:
            yield chunk
    return stream()
