"""Keys are written for their owner only and never through a planted symlink; plain text only on loopback."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from splitexit.errors import ClusterError, ConfigError
from splitexit.runtime.security import CA_KEY, init_ca, issue_certificate


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_key_replacing_a_readable_file_ends_up_owner_only(tmp_path: Path) -> None:
    init_ca(tmp_path)
    key = tmp_path / "cloud1.key"
    key.write_text("old")
    key.chmod(0o644)  # O_CREAT keeps an existing file's mode: the key must not inherit this one
    issue_certificate(tmp_path, "cloud1")
    assert mode(key) == 0o600 and mode(tmp_path / CA_KEY) == 0o600
    assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")


def test_a_symlink_at_the_keys_path_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    init_ca(tmp_path)
    target = tmp_path / "elsewhere.txt"
    target.write_text("not a key")
    (tmp_path / "cloud1.key").symlink_to(target)
    with pytest.raises(ConfigError, match="symlink"):
        issue_certificate(tmp_path, "cloud1")
    assert target.read_text() == "not a key"


@pytest.mark.parametrize("address, allowed", [
    ("127.0.0.1:50061", True), ("127.3.4.5:1", True), ("localhost:50061", True), ("[::1]:50061", True),
    ("10.0.0.5:50061", False), ("example.com:50061", False), ("0.0.0.0:50061", False)])
def test_plain_text_channels_only_to_loopback(address: str, allowed: bool) -> None:
    import asyncio

    from splitexit.runtime.remote import open_channel

    async def main() -> None:
        if allowed:
            await open_channel(address, "cloud1", None, 1 << 20).close()
        else:
            with pytest.raises(ClusterError, match="in plain text"):
                open_channel(address, "cloud1", None, 1 << 20)

    asyncio.run(main())
