"""What every config model shares: unknown keys refused, frozen, and one way to word a validation error."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["SpecModel", "describe_validation_error"]


def describe_validation_error(error: ValidationError) -> str:
    """Every problem pydantic found, as `where: what` pairs on one line, for messages to users."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in error.errors())


class SpecModel(BaseModel):
    """Base of every config model: a typo in a file is reported instead of silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)
