"""Small types every result module shares: the enum-name helper and a text token. Imports no other result module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def enum_name(wrapper: Any, number: int, prefix: str) -> str:
    """INTERVENTION_OP_SET -> "SET"; an unknown number (newer server) -> its digits."""
    try:
        return wrapper.Name(number).removeprefix(prefix)
    except ValueError:
        return str(number)


@dataclass(frozen=True)
class TextToken:
    """One token of a text: its position, id and decoded text."""

    position: int
    id: int
    text: str
