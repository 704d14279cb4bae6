"""The toy world's files shipped inside the package: classifier, teacher, student, and the MMDiT teacher and student."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from loopfree.utils.errors import LoopfreeError

#: Shipped folders under ``loopfree/assets``.
ASSETS = ("classifier", "teacher", "student", "teacher-mmdit", "student-mmdit")
#: The shipped pipelines, which ``--model`` (and a study's ``teacher``) may name
MODELS = tuple(a for a in ASSETS if a != "classifier")


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


def model_folder(model: str | os.PathLike | None, default: str = "student") -> Path:
    """A ``--model``-style argument as a folder: a bundled model's name (``teacher-mmdit``) unless a path of that name
    exists, else the path; None: the bundled ``default``."""
    if model is None:
        return bundled(default)
    if str(model) in MODELS and not Path(model).exists():
        return bundled(str(model))
    return Path(model)
