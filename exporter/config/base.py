"""What every config section shares: the frozen base model and small field helpers."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, PlainSerializer

from exporter.durations import parse_duration

K = TypeVar("K")
V = TypeVar("V")

#: A read-only mapping (``MappingProxyType``) that keeps document order and dumps as a dict.
FrozenMap = Annotated[
    Mapping[K, V],
    AfterValidator(lambda value: MappingProxyType(dict(value))),
    PlainSerializer(dict),
]


def _d(text: str) -> float:
    return parse_duration(text)


class _Model(BaseModel):
    """Base of every config section: immutable, unknown keys rejected, defaults validated."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)
