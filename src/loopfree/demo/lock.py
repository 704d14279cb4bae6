"""A study plan's lock: every variant's full ``loopfree distill`` settings, resolved once and kept beside the plan, so a
later change of the toy recipe (``TOY_DISTILL``) or of a bundled model never changes what an old plan runs.

    studies/recipe-reg1.yaml  →  studies/recipe-reg1.lock.yaml      (written by ``loopfree study``, committed beside it)

A variant is resolved the first time a plan names it — the plan's ``base`` and its own settings over
``TOY_DISTILL`` and the distill defaults — and from then on read from the lock; a variant whose settings in the plan
no longer match the ones it was locked with is refused by name (rename it, or delete its entry to resolve it anew).
A model a plan starts from (``student_init``, a ``sampled`` row) is locked by the SHA-256 of its weights and refused
if the folder now holds other weights. Run length (``max_steps``) stays the plan's: a plan may grow its budget.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import yaml

from loopfree.pipelines.files import denoiser_sha256
from loopfree.toy.assets import bundled
from loopfree.toy.settings import TOY_DISTILL
from loopfree.training.config import DistillConfig
from loopfree.utils.errors import LoopfreeError, short
from loopfree.utils.outputs import write_atomic

#: distill settings a variant may not set: the study owns them
OWNED = ("teacher", "prompts", "out", "seed", "eval_every", "resume", "overwrite")
#: what the lock does not hold: the study's own, where pairs are cached, and the (growable) run length
UNLOCKED = (*OWNED, "regression_cache", "max_steps")
HEADER = "# written by `loopfree study`: each variant's full distill settings, resolved once (docs/toy-world.md)\n"


def lock_path(plan_path: str | Path) -> Path:
    """Where the lock of the plan at ``plan_path`` lives: ``<plan>.lock.yaml`` beside it."""
    plan_path = Path(plan_path)
    return plan_path.with_name(plan_path.stem + ".lock.yaml")


def model_sha256(folder: str | Path) -> str:
    """SHA-256 of a pipeline folder's denoiser weights (its UNet or transformer) and its ``loopfree.json`` (the decoder
    steps), in name order."""
    digest = denoiser_sha256(folder, with_record=True)
    if digest is None:
        raise LoopfreeError(f"{short(str(folder))} has no UNet or transformer weights to hash")
    return digest


def settings_key(*parts: object) -> str:
    """A short hash of JSON-able ``parts``: the name of a cached score."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def resolve(asked: dict) -> dict:
    """The full distill settings of a variant that asks for ``asked`` over the toy recipe (checked by DistillConfig)."""
    config = DistillConfig(teacher="-", prompts="-", out="-", **{"guidance": 4.5, **TOY_DISTILL, **asked})
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in UNLOCKED}


def sampled_model(row: dict) -> str:
    """The folder a ``sampled`` row scores (default: the bundled student), absolute."""
    return os.path.abspath(row.get("model") or bundled("student"))


def check_model(what: str, folder: str, sha256: str) -> None:
    """Refuse ``folder`` if its weights are not the ones locked as ``sha256``."""
    now = model_sha256(folder)
    if now != sha256:
        raise LoopfreeError(f"{what}: {short(folder)} holds other weights than the plan was locked with "
                            f"(sha256 {sha256[:12]}…, now {now[:12]}…): point it at those weights or unlock the entry")


def load_lock(path: Path) -> dict:
    if not path.is_file():
        return {"variants": {}, "sampled": {}}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise LoopfreeError(f"cannot read lock {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or set(data) - {"variants", "sampled"}:
        raise LoopfreeError(f"lock {path}: expected only `variants:` and `sampled:`")
    return {"variants": data.get("variants") or {}, "sampled": data.get("sampled") or {}}


def locked(plan, path: Path) -> dict:
    """The lock of ``plan`` (a StudyPlan) at ``path``, with every variant and sampled row it names; new ones are
    resolved and written back, changed ones refused."""
    lock = load_lock(path)
    before = json.dumps(lock, sort_keys=True)
    for name, variant in plan.variants.items():
        asked = {k.replace("-", "_"): v for k, v in {**plan.base, **variant}.items()}
        entry = lock["variants"].get(name)
        if entry is None:
            entry = lock["variants"][name] = {"asked": asked, "settings": resolve({k: v for k, v in asked.items() if k != "max_steps"})}
            if entry["settings"]["student_init"]:
                entry["student_init_sha256"] = model_sha256(entry["settings"]["student_init"])
        elif entry["asked"] != asked:
            raise LoopfreeError(f"variant {name} asks for other settings than {path.name} locked it with "
                                f"({short(entry['asked'])}): rename the variant or delete its entry from the lock")
        if entry.get("student_init_sha256"):
            check_model(f"variant {name}'s student_init", entry["settings"]["student_init"], entry["student_init_sha256"])
    for name, row in plan.sampled.items():
        entry = lock["sampled"].get(name)
        if entry is None:
            model = sampled_model(row)
            entry = lock["sampled"][name] = {"asked": row, "sha256": model_sha256(model)}
        elif entry["asked"] != row:
            raise LoopfreeError(f"sampled row {name} asks for other settings than {path.name} locked it with: rename it "
                                "or delete its entry from the lock")
        check_model(f"sampled row {name}", sampled_model(row), entry["sha256"])
    if json.dumps(lock, sort_keys=True) != before:
        write_atomic(path, HEADER + yaml.safe_dump(lock, sort_keys=False, allow_unicode=True))
    return lock
