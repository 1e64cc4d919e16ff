"""Scalars as the user wrote them: the float that remembers its text, and the text of a plain
scalar. The loader makes them, the models read them; no YAML here, so the replicas (which
import the models through the contract) never load a YAML parser."""
from __future__ import annotations

from typing import Any


class YamlFloat(float):
    """A float that remembers how it was written, so `python: 3.10` can still be the string '3.10'."""

    text: str

    def __new__(cls, value: float, text: str):
        obj = super().__new__(cls, value)
        obj.text = text
        return obj

    def __str__(self) -> str:  # "python{{ v }}" with v: 3.10 renders as written: python3.10
        return self.text

    def __reduce__(self):
        return (float, (float(self),))


def scalar_text(value: Any) -> str:
    """The text a user wrote for a plain scalar, for fields that want a string."""
    if isinstance(value, YamlFloat):
        return value.text
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
