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


def sampled_items(row: dict) -> list[dict]:
    """What a ``sampled`` row scores, one item per model: ``model`` (default: the bundled student) with its ``lora`` (a
    LoRA student on it) and ``style_lora``, absolute; a list in ``model`` or ``lora`` gives one item each (a
    single other one goes with every item)."""
    def listed(key: str, default) -> list:
        value = row.get(key, default)
        return value if isinstance(value, list) else [value]

    models, loras = listed("model", bundled("student")), listed("lora", None)
    count = max(len(models), len(loras))
    if {len(models), len(loras)} - {1, count}:
        raise LoopfreeError(f"sampled row: {len(models)} models but {len(loras)} LoRAs")
    style = row.get("style_lora")
    return [{"model": os.path.abspath(m), "lora": l and os.path.abspath(l), "style_lora": style and os.path.abspath(style)}
            for m, l in zip(models * (count // len(models)), loras * (count // len(loras)))]


def item_sha256(item: dict) -> str:
    """SHA-256 of what a sampled item loads: its model's denoiser and record (:func:`model_sha256`), alone when it
    has no LoRA, else with its LoRAs' files."""
    from loopfree.evaluation.features import file_sha256
    from loopfree.pipelines.loading import check_lora, style_weights
    from loopfree.pipelines.pipeline import LORA_WEIGHTS

    parts = [model_sha256(item["model"])]
    if item["lora"]:
        check_lora(item["lora"])
        parts.append(file_sha256(Path(item["lora"]) / LORA_WEIGHTS))
    if item["style_lora"]:
        parts.append(file_sha256(style_weights(item["style_lora"])))
    return parts[0] if len(parts) == 1 else hashlib.sha256("/".join(parts).encode()).hexdigest()


def sampled_sha256(row: dict) -> str | list[str]:
    """A sampled row's hash: its item's (:func:`item_sha256`), a list of them for several."""
    hashes = [item_sha256(item) for item in sampled_items(row)]
    return hashes[0] if len(hashes) == 1 else hashes


def check_model(what: str, folder: str, sha256: str, now: str | None = None) -> None:
    """Refuse ``folder`` if its weights (``now``, default its :func:`model_sha256`) are not the ones locked as ``sha256``."""
    now = now or model_sha256(folder)
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
        now = sampled_sha256(row)
        if entry is None:
            entry = lock["sampled"][name] = {"asked": row, "sha256": now}
        elif entry["asked"] != row:
            raise LoopfreeError(f"sampled row {name} asks for other settings than {path.name} locked it with: rename it "
                                "or delete its entry from the lock")
        locked_hashes = entry["sha256"] if isinstance(entry["sha256"], list) else [entry["sha256"]]
        for item, before, after in zip(sampled_items(row), locked_hashes, now if isinstance(now, list) else [now]):
            check_model(f"sampled row {name}", item["lora"] or item["model"], before, after)
    if json.dumps(lock, sort_keys=True) != before:
        write_atomic(path, HEADER + yaml.safe_dump(lock, sort_keys=False, allow_unicode=True))
    return lock
