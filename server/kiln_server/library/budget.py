"""Which resident models to unload so that another one fits the memory budget."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Resident:
    """A resident model as eviction sees it: its bytes and when it was last used."""

    name: str
    memory_bytes: int
    last_used: float


def fits_alone(need: int, budget: int) -> bool:
    """Whether a model of `need` bytes fits the budget at all (0: no budget)."""
    return budget == 0 or need <= budget


def choose_evictions(
    need: int, budget: int, resident: Sequence[Resident], busy: Collection[str]
) -> list[str] | None:
    """The least recently used resident models, none of them `busy`, whose unloading makes
    room for `need` more bytes within `budget`: [] when it already fits, None when even
    unloading every idle model is not enough (the load must wait for busy ones to finish).
    With no budget (0) everything fits.
    """
    if budget == 0:
        return []
    used = sum(model.memory_bytes for model in resident)
    if used + need <= budget:
        return []
    victims: list[str] = []
    for model in sorted(resident, key=lambda m: m.last_used):
        if model.name in busy:
            continue
        victims.append(model.name)
        used -= model.memory_bytes
        if used + need <= budget:
            return victims
    return None
