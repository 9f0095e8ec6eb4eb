"""What every config model shares: unknown keys refused, frozen, and one way to word a validation error."""

from __future__ import annotations

from difflib import get_close_matches

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, model_validator

from splitexit.units import format_duration, parse_duration

__all__ = ["FROM_FILE", "SpecModel", "describe_validation_error", "did_you_mean", "seconds_from", "written_duration"]

#: Validation context key that `config/load.py` sets for a cluster *file*: there a duration needs its unit
#: (``latency: 10`` is refused: 10 ms or 10 s?); from Python a bare number is seconds.
FROM_FILE = "cluster_file"

#: What pydantic puts before the text of a ValueError a validator raised (noise in a one-line message).
_VALUE_ERROR = "Value error, "


def describe_validation_error(error: ValidationError) -> str:
    """Every problem pydantic found, as `where: what` pairs on one line, for messages to users."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg'].removeprefix(_VALUE_ERROR)}"
                     for e in error.errors())


def did_you_mean(word: str, choices: list[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices`` to a misspelt ``word``, or nothing."""
    close = get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


class SpecModel(BaseModel):
    """Base of every config model: a typo in a file is reported instead of silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: object) -> object:
        """Refuse unknown keys with the closest known one, which pydantic's "extra inputs" error does not name."""
        if not isinstance(data, dict) or cls.model_config.get("extra") != "forbid":
            return data
        spelt = [field.alias or name for name, field in cls.model_fields.items()]
        known = set(spelt) | set(cls.model_fields)
        unknown = [key for key in data if key not in known]
        if unknown:
            raise ValueError("; ".join(f"unknown key {key!r}{did_you_mean(str(key), spelt)}" for key in unknown)
                             + f" (known: {', '.join(spelt)})")
        return data


def seconds_from(value: str | float, info: ValidationInfo) -> float:
    """A duration field's value in seconds, with units required when it comes from a cluster file."""
    return parse_duration(value, need_unit=bool(info.context and info.context.get(FROM_FILE)))


def written_duration(seconds: float | None) -> str | None:
    """A duration as splitexit writes it into files (`plan --write`), so that it loads back under the file rule."""
    return None if seconds is None else format_duration(seconds)
