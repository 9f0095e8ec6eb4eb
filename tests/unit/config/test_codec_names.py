"""Codec names: every combination has one name that reads back, and bad names say what would do."""

from __future__ import annotations

import pytest

from splitexit.config.codec_names import CodecSpec, list_codecs, parse_codec
from splitexit.errors import ConfigError


def test_names_round_trip_and_cover_every_combination() -> None:
    names = list_codecs()
    assert len(names) == len(set(names)) == 15 and names[0] == "raw"
    assert [parse_codec(n).name for n in names] == names
    assert parse_codec(" INT8C+Zstd ") == CodecSpec("int8", "zstd", per_channel=True)


@pytest.mark.parametrize("text", ["", "int4", "raw+gzip", "raw+", "+lz4", "fp16+lz4+zstd", "raw+none", "auto"])
def test_bad_codec_names_list_the_valid_ones(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_codec(text)
    assert "choose_codec" in str(info.value) if text == "auto" else "int8c+zstd" in str(info.value)


def test_spec_rejects_nonsense() -> None:
    with pytest.raises(ConfigError):
        CodecSpec("fp16", "none", per_channel=True)
    with pytest.raises(ConfigError):
        CodecSpec("fp8")
