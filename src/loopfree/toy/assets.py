"""The toy world's files shipped inside the package: classifier, teacher, student and the MMDiT teacher."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from loopfree.utils.errors import LoopfreeError

#: Shipped folders under ``loopfree/assets``.
ASSETS = ("classifier", "teacher", "student", "teacher-mmdit")


def asset_path(name: str) -> Path:
    """Where shipped asset ``name`` lives (whether or not it is there yet)."""
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; one of {', '.join(ASSETS)}")
    return Path(str(resources.files("loopfree") / "assets" / name))


def bundled(name: str) -> Path:
    """The folder of shipped asset ``name``; an error if this installation lacks it."""
    path = asset_path(name)
    if not path.is_dir():
        raise LoopfreeError(f"the bundled {name} is missing from this installation ({path})")
    return path
