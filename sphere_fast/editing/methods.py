"""The editing methods by name. A new method is one module with an
:class:`~.strategy.EditMethod` subclass and one entry here."""
from __future__ import annotations

from .alphaedit import AlphaEdit
from .ft import FT
from .memit import MEMIT
from .prune import PRUNE
from .rect import RECT
from .strategy import EditMethod

METHODS: dict[str, type[EditMethod]] = {cls.name: cls for cls in (MEMIT, AlphaEdit, RECT, PRUNE, FT)}


def method_class(name: str) -> type[EditMethod]:
    """The :class:`EditMethod` registered as ``name`` (case-insensitive); ValueError naming the known ones."""
    key = str(name).lower()
    if key not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {name!r}")
    return METHODS[key]
