"""``loopfree study``: a plan of toy-world distillations — variants × training seeds × one budget — that survives
interruptions, scored against the toy world's ground truth.

    loopfree study studies/probe.yaml --out .studies/probe

The plan (YAML, :class:`StudyPlan`) names variants, each a set of ``loopfree distill`` settings over the toy recipe
(``TOY_DISTILL``), resolved once into the plan's lock beside it (:mod:`loopfree.demo.lock`). Every run is an ordinary distillation folder, ``runs/<variant>/seed<N>``: finished runs are
skipped, stopped ones resume from their checkpoint, and they train two at a time, one thread each
(:func:`~loopfree.demo.demo.side_by_side`). A plan may grow between invocations (more variants, seeds or steps).
Each finished run is scored once on the held-out prompts (``scores/``, named by a hash of the run's full settings; a
teacher or sampled row by its model's weights), as are the teacher's rows; then
``study.json``, ``table.md`` (mean ± sd over seeds, training minutes) and ``curves.png`` are written.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from loopfree.demo.curves import plot_curves, seed_curves
from loopfree.demo.demo import (RowScorer, finished, load_student, published, side_by_side, summarise,
                               teacher_sampler, train_run)
from loopfree.demo.lock import OWNED, locked, model_sha256, sampled_items, settings_key
from loopfree.evaluation.generation import Sampling
from loopfree.pipelines.loading import inspect_pipeline, load_pipeline
from loopfree.toy.assets import model_folder
from loopfree.toy.settings import EVAL_POOL
from loopfree.toy.world import check_domain, heldout_prompts, training_prompts
from loopfree.training.config import DistillConfig
from loopfree.training.pairs import prepare_teacher_pairs
from loopfree.utils.errors import LoopfreeError
from loopfree.utils.outputs import OutputFolder, write_atomic, write_json

SHOWN = ("alignment", "fd", "diversity", "precision", "recall", "density", "coverage")


@dataclass
class StudyPlan:
    """What a study trains and how it is scored."""

    variants: dict[str, dict] = field(default_factory=dict)  # name -> distill settings over TOY_DISTILL (e.g. objective: sid)
    max_steps: int = 1000  # distillation steps of every run unless its variant sets its own (the curves flatten by 1,000)
    sampled: dict[str, dict] = field(default_factory=dict)  # name -> {steps: K, model: folder(s) (default: the bundled
    # student), lora: LoRA student(s) on it, style_lora: a LoRA on it, style_scale, mode: loop_free (default) or loop
    # (its guided loop, as the teacher rows)}: scored untrained, mean ± sd over lists
    eval_every: int = 100  # learning-curve spacing (0: none)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # training seeds of every variant
    num_prompts: int = 64  # held-out evaluation prompts (distinct attribute combinations)
    images_per_prompt: int = 4
    curve_prompts: int = 16  # prompts of the learning curves (scored every eval_every steps: kept cheap)
    base: dict = field(default_factory=dict)  # distill settings of every variant, over TOY_DISTILL
    teacher: str | None = None  # a bundled teacher's name (teacher-mmdit) or a folder; default the bundled UNet teacher
    teacher_steps: list[int] = field(default_factory=lambda: [4, 50])  # the teacher rows: its guided sampler (DDIM; SD3: Euler)
    guidance: float = 4.5  # the teacher rows' guidance (paper: 4.5)
    distill_prompts: int = 4000  # training prompt count
    seed: int = 0  # evaluation prompts and x_T
    domain: str = "base"  # the world the real images of fd come from (a shifted one: and the style score)

    def __post_init__(self) -> None:
        names = {f.name for f in dataclasses.fields(DistillConfig)}
        if not self.variants and not self.sampled:
            raise LoopfreeError("the plan names no variants and no sampled rows")
        for where, settings in [("base", self.base), *self.variants.items()]:
            if not isinstance(settings, dict):
                raise LoopfreeError(f"plan: {where} must be a mapping of distill settings")
            bad = sorted(k for k in settings if k.replace("-", "_") not in names or k.replace("-", "_") in OWNED)
            if bad:
                raise LoopfreeError(f"plan: {where} sets {', '.join(bad)}, which a variant cannot set")
        for name, row in self.sampled.items():
            if (not isinstance(row, dict) or set(row) - {"model", "lora", "style_lora", "style_scale", "mode", "steps"}
                    or not isinstance(row.get("steps"), int) or row["steps"] < 1 or row.get("mode", "loop_free") not in ("loop_free", "loop")):
                raise LoopfreeError(f"plan: sampled {name} must be {{steps: K ≥ 1}} and optionally model, lora, style_lora, "
                                    "style_scale, mode (loop_free or loop)")
        check_domain(self.domain)
        if not self.seeds or min(self.max_steps, self.images_per_prompt - 1, self.num_prompts, self.curve_prompts) < 1:
            raise LoopfreeError("plan: seeds, max_steps, num_prompts and curve_prompts need ≥ 1, images_per_prompt ≥ 2")
        if max(self.num_prompts, self.curve_prompts) > EVAL_POOL:
            raise LoopfreeError(f"plan: num_prompts and curve_prompts must be at most {EVAL_POOL}")


def load_plan(path: str | Path) -> StudyPlan:
    """A :class:`StudyPlan` from YAML; unknown keys are errors."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise LoopfreeError(f"cannot read plan {path}: {str(e).splitlines()[0]}") from None
    known = {f.name for f in dataclasses.fields(StudyPlan)}
    unknown = sorted(set(data) - known) if isinstance(data, dict) else ["(not a mapping)"]
    if unknown:
        raise LoopfreeError(f"plan {path}: unknown key(s) {', '.join(map(str, unknown))}")
    if "variants" not in data and "sampled" not in data:
        raise LoopfreeError(f"plan {path}: no `variants:` and no `sampled:`")
    return StudyPlan(**data)


def run_configs(plan: StudyPlan, lock: dict, out: Path, teacher: str, prompts_file: Path) -> dict[str, list[DistillConfig]]:
    """Every run's distill configuration, by variant: its locked settings, the plan's run length."""
    def config(name: str, seed: int) -> DistillConfig:
        entry = lock["variants"][name]
        return DistillConfig(teacher=teacher, prompts=str(prompts_file), out=str(out / "runs" / name / f"seed{seed}"), seed=seed,
                             eval_every=plan.eval_every, max_steps=entry["asked"].get("max_steps", plan.max_steps),
                             regression_cache=entry["asked"].get("regression_cache", str(out / "pairs")), **entry["settings"])

    return {name: [config(name, s) for s in plan.seeds] for name in plan.variants}


def _cached(path: Path, compute) -> dict:
    """``compute()`` once; its JSON is kept at ``path``."""
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    write_json(path, result)
    return result


def run_study(plan: StudyPlan, lock_file: str | Path, out: str | Path, teacher: str | None = None, train: bool = True) -> list[dict]:
    """Train what is missing (unless not ``train``: a study in progress tabulated), score what is new; writes
    study.json, table.md and curves.png. ``lock_file``: the plan's lock (:func:`~loopfree.demo.lock.lock_path`),
    extended with what is new. ``teacher``: instead of the plan's. The table's rows."""
    teacher_path = os.path.abspath(model_folder(teacher or plan.teacher, "teacher"))
    try:
        info = inspect_pipeline(teacher_path, transformers=True)
    except LoopfreeError as e:
        raise LoopfreeError(f"teacher: {e}") from None
    size = info.default_size
    identity = dict(teacher=teacher_path, seed=plan.seed, distill_prompts=plan.distill_prompts, num_prompts=plan.num_prompts,
                    images_per_prompt=plan.images_per_prompt, curve_prompts=plan.curve_prompts, guidance=plan.guidance,
                    **({"domain": plan.domain} if plan.domain != "base" else {}))  # only when shifted: older studies match
    folder = OutputFolder(out, "study", identity, resumable=True)
    root = folder.final
    prompts_file = root / "distill_prompts.txt"
    lock = locked(plan, Path(lock_file))
    configs = run_configs(plan, lock, root, teacher_path, prompts_file)
    todo = [c for group in configs.values() for c in group if not (folder.resuming and finished(c))]
    with folder:
        pool = heldout_prompts(EVAL_POOL, seed=plan.seed)
        if not prompts_file.is_file():
            write_atomic(prompts_file, "\n".join(training_prompts(plan.distill_prompts, pool, plan.seed)) + "\n")
        curve = RowScorer(pool, plan.curve_prompts, plan.images_per_prompt, plan.seed, size, plan.domain) if plan.eval_every else None
        if train:
            for config in todo:  # the teacher pairs of the regression term, once, with every thread
                prepare_teacher_pairs(config)
            side_by_side([(train_run, (c, curve)) for c in todo], "runs")
        return _score(plan, lock, root, teacher_path, teacher_sampler(info.family), size, pool, configs)


def _score(plan: StudyPlan, lock: dict, root: Path, teacher_path: str, sampler: str, size: int, pool: list[str],
           configs: dict) -> list[dict]:
    scorer = RowScorer(pool, plan.num_prompts, plan.images_per_prompt, plan.seed, size, plan.domain)
    (root / "scores").mkdir(exist_ok=True)
    rows = []

    def scored(path: str | Path, mode: str, steps: int, guidance: float, **adapters) -> dict:
        """The scores of the pipeline at ``path`` (with ``adapters``: load_pipeline's LoRAs) sampled in ``mode``."""
        return scorer.row(load_pipeline(path, **adapters), Sampling(size, size, mode, steps, None, guidance))[0]

    teacher_sha = model_sha256(teacher_path)
    for steps in plan.teacher_steps:
        key = settings_key(teacher_sha, steps, plan.guidance)
        scores = _cached(root / "scores" / f"teacher-{steps}step-{key}.json", lambda: scored(teacher_path, "loop", steps, plan.guidance))
        rows.append({**summarise(f"teacher {steps}-step {sampler}", [scores]), "train_minutes": None})
    for name, row in plan.sampled.items():
        hashes = lock["sampled"][name]["sha256"]
        mode, scale = row.get("mode", "loop_free"), row.get("style_scale", 1.0)
        guidance = plan.guidance if mode == "loop" else 1.0
        runs = []
        for item, sha in zip(sampled_items(row), hashes if isinstance(hashes, list) else [hashes]):
            key = settings_key(sha, row["steps"], *([scale] if item["style_lora"] else []),
                               *([mode, guidance] if mode == "loop" else []))  # as before for the rows that had no choice
            runs.append(_cached(root / "scores" / f"sampled-{name}-{key}.json", lambda: scored(
                item["model"], mode, row["steps"], guidance, lora=item["lora"], style_lora=item["style_lora"], style_scale=scale)))
        rows.append({**summarise(name, runs), "train_minutes": None, "settings": row})
    for name, group in configs.items():
        runs = []
        for config in group:
            run = Path(config.out)
            if not published(config):
                continue

            def student_scores() -> dict:
                timing = json.loads((run / "timing.json").read_text())
                pipe = load_student(config)
                return {**scorer.row(pipe, scorer.one_pass(pipe))[0], "train_minutes": timing["train_seconds"] / 60}

            key = settings_key(lock["variants"][name]["settings"], config.seed, config.max_steps)
            runs.append(_cached(root / "scores" / f"{name}-seed{config.seed}-{key}.json", student_scores))
        if runs:
            minutes = [r["train_minutes"] for r in runs]
            rows.append({**summarise(name, runs), "seeds": [c.seed for c in group][: len(runs)],
                         "train_minutes": sum(minutes) / len(minutes), "settings": plan.variants[name],
                         "locked": lock["variants"][name]["settings"]})
    curves = {}
    for name, group in configs.items():
        logs = [Path(c.out) / "eval.jsonl" for c in group if published(c)]
        if plan.eval_every and logs:
            curves[name] = seed_curves(logs)
    if curves:
        teachers = {r["name"]: {**r, "accuracy": sum(r["per_attribute_accuracy"].values()) / len(r["per_attribute_accuracy"])}
                    for r in rows[: len(plan.teacher_steps)]}
        plot_curves(curves, teachers, root / "curves.png")
    write_json(root / "study.json", {"plan": dataclasses.asdict(plan), "lock": lock, "rows": rows, "curves": curves})
    write_atomic(root / "table.md", markdown_table(rows) + "\n")
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table: mean ± sd over seeds, training minutes per run."""
    def cell(row: dict, key: str) -> str:
        if row.get(key) is None:
            return "–"
        spread = row.get(f"{key}_std")
        return f"{row[key]:.3f}" + (f" ± {spread:.3f}" if spread is not None else "")

    shown = (*SHOWN, *(["style"] if any("style" in row for row in rows) else []))  # a shifted domain's rows
    head = ["", "seeds", *shown, "train min"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row in rows:
        minutes = "–" if row["train_minutes"] is None else f"{row['train_minutes']:.1f}"
        lines.append("| " + " | ".join([row["name"], str(row["runs"]), *(cell(row, k) for k in shown), minutes]) + " |")
    return "\n".join(lines)
