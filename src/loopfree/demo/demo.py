"""``loopfree demo``: the whole method on the bundled toy teacher, in minutes on a CPU.

    loopfree demo --out loopfree-demo

1. Distil the bundled teacher into students with the real ``loopfree distill`` machinery (prompts
   only; the attribute combinations of the evaluation prompts are kept out of the training prompts).
2. Sample a fixed held-out prompt set, several seeds per prompt, from the teacher (50- and 4-step
   DDIM with guidance, and 50-step encoder propagation — Faster Diffusion's default key steps, the
   training-free way to share the encoder) and from every student (one pass, no guidance), all from the
   same x_T.
3. Score every row against the toy world's ground truth with ``loopfree eval``'s toy backend (the same
   seeds, PNG-exact images, extractor and metric functions: :mod:`loopfree.evaluation.toy`) and write
   ``grid.png``, ``metrics.json`` and the printed table. With ``--train-seeds N`` every student is
   trained N times and the table gives mean ± spread over them (docs/toy-world.md's studies).

Finished students are reused and interrupted ones resume, so the same command can be run again. Every row is made
with one torch thread; with two or more, rows run side by side, one worker process each (:func:`side_by_side`).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from loopfree.training.config import DistillConfig, load_config
from loopfree.utils.devices import cpu_threads
from loopfree.utils.errors import LoopfreeError
from loopfree.evaluation.generation import Job, Sampling, batches, plan_jobs
from loopfree.evaluation.generation import generate_jobs
from loopfree.evaluation.scores import distribution_scores
from loopfree.utils.images import image_grid
from loopfree.pipelines.families import FAMILIES
from loopfree.pipelines.loading import inspect_pipeline, load_pipeline
from loopfree.pipelines.pipeline import LORA_WEIGHTS
from loopfree.utils.outputs import OutputFolder, save_image, write_atomic, write_json
from loopfree.toy.assets import bundled
from loopfree.demo.curves import plot_curves, seed_curves
from loopfree.evaluation.toy import ToyExtractor, real_reference, toy_scores
from loopfree.toy.settings import DEMO_BUDGET, EVAL_POOL, MMDIT_DISTILL, STUDENTS, TEACHER_ARCHS, TOY_DISTILL, DemoConfig
from loopfree.toy.world import heldout_prompts, parse_prompt, training_prompts
from loopfree.training.pairs import prepare_teacher_pairs
from loopfree.training.trainer import distill

METRICS = ("alignment", "fd", "precision", "recall", "density", "coverage", "diversity")
PRDC = ("precision", "recall", "density", "coverage")
#: below this many images, k = 5 neighbourhoods cover the whole real set: precision/recall/density/coverage read
#: ≈ 1.000 in every row (16 × 4 images), so the table shows per-attribute accuracies instead (metrics.json keeps all)
PRDC_MIN_IMAGES = 256
ATTRIBUTES = ("colour", "shape")  # the attributes students miss (size, position, background: ≥ 0.99 everywhere)
GRID_COLUMNS = 8
GRID_SCALE = 3  # 192-pixel cells: room for each column's attributes above it
BATCH = 64  # images per pipeline call (``loopfree eval --batch-size 64`` reproduces a row bit for bit)


def student_config(cfg: DemoConfig, kind: str, seed: int, teacher: str, prompts_file: Path, family: str = "sd") -> DistillConfig:
    """The ``loopfree distill`` configuration of one student run (of a ``family`` teacher: an SD3 one's recipe is
    translated, ``MMDIT_DISTILL``)."""
    recipe = MMDIT_DISTILL if family == "sd3" else {}
    return DistillConfig(
        teacher=teacher, prompts=str(prompts_file), out=str(Path(os.path.abspath(cfg.out)) / "students" / f"{kind}-seed{seed}"),
        max_steps=cfg.max_steps, seed=seed, eval_every=cfg.eval_every,
        **{"guidance": cfg.guidance, **TOY_DISTILL, **DEMO_BUDGET, **recipe, **cfg.distill, **STUDENTS[kind][1]},
    )


def finished(config: DistillConfig) -> bool:
    """Whether ``config.out`` holds the finished student of ``config``; an error if it holds a run
    with other settings (a run that only stopped earlier is resumed, or continued to more steps)."""
    saved = Path(config.out) / "distill_config.yaml"
    if not saved.is_file():
        return False
    previous = load_config(saved)
    same = dict(max_steps=config.max_steps, eval_every=config.eval_every, resume=None)
    if dataclasses.replace(previous, **same) != dataclasses.replace(config, resume=None):
        raise LoopfreeError(f"{config.out} holds a student trained with other settings: use another --out")
    if previous.max_steps > config.max_steps:
        raise LoopfreeError(f"{config.out} holds a student trained for {previous.max_steps} steps, more than --max-steps {config.max_steps}")
    return previous.max_steps == config.max_steps and published(config)


def published(config: DistillConfig) -> bool:
    """Whether ``config.out`` holds its published student: a pipeline folder, or a LoRA student's adapter."""
    return (Path(config.out) / ("model_index.json" if config.student_lora_rank is None else LORA_WEIGHTS)).is_file()


def load_student(config: DistillConfig):
    """The student pipeline ``config.out`` published (a LoRA student: its teacher with the adapter loaded)."""
    if config.student_lora_rank is None:
        return load_pipeline(config.out)
    return load_pipeline(config.teacher, lora=config.out)


def sample_images(pipe, jobs: list[Job], sampling: Sampling) -> tuple[np.ndarray, float]:
    """The images of ``jobs`` as uint8 (N, 64, 64, 3), exactly what ``loopfree eval`` writes as PNGs, and the
    denoising time per image in ms (text encoding, UNet passes and sampler; the VAE decode is not timed)."""
    images, seconds = [], 0.0
    for batch in batches(jobs, BATCH):
        pil, spent = generate_jobs(pipe, batch, sampling, pipe.device)
        images += [np.asarray(im) for im in pil]
        seconds += spent
    return np.stack(images), 1000.0 * seconds / len(jobs)


def summarise(name: str, runs: list[dict[str, float]]) -> dict:
    """One table row: the mean of each metric over ``runs`` (training seeds) and its spread (sample
    standard deviation; null for a single run)."""
    row: dict = {"name": name, "runs": len(runs)}
    for key in (*METRICS, "unet_ms_per_image", *(k for k in ("train_seconds", "style") if k in runs[0])):
        values = np.array([r[key] for r in runs], dtype=float)
        row[key] = float(values.mean())
        row[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else None
    row["per_attribute_accuracy"] = {k[len("accuracy_"):]: float(np.mean([r[k] for r in runs])) for k in runs[0] if k.startswith("accuracy_")}
    return row


def format_table(rows: list[dict], num_images: int = PRDC_MIN_IMAGES) -> str:
    """The rows as an aligned text table, ``mean ± spread`` where there are several runs; the k-NN scores only
    where ``num_images`` (per row) is enough for them to discriminate, else the per-attribute accuracies."""
    def cell(row: dict, key: str) -> str:
        if key in ATTRIBUTES:
            return f"{row['per_attribute_accuracy'][key]:.3f}"
        digits = 0 if key == "unet_ms_per_image" else 3
        text = f"{row[key]:.{digits}f}"
        return text + (f" ± {row[key + '_std']:.{digits}f}" if row.get(key + "_std") is not None else "")

    shown = METRICS if num_images >= PRDC_MIN_IMAGES else (*(m for m in METRICS if m not in PRDC), *ATTRIBUTES)
    keys = (*shown, "unet_ms_per_image")
    table = [["", *[k.replace("unet_ms_per_image", "unet ms/img") for k in keys]]]
    table += [[row["name"], *[cell(row, k) for k in keys]] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in table)


def run_demo(cfg: DemoConfig, overwrite: bool = False) -> list[dict]:
    """Train, sample, score; writes ``grid.png`` and ``metrics.json`` into ``cfg.out``; the table rows."""
    teacher_path = os.path.abspath(cfg.teacher) if cfg.teacher else str(bundled(TEACHER_ARCHS[cfg.teacher_arch]))
    try:
        info = inspect_pipeline(teacher_path, transformers=True)
    except LoopfreeError as e:
        raise LoopfreeError(f"--teacher: {e}") from None
    if info.family not in ("sd", "sd3"):
        raise LoopfreeError(f"--teacher: the demo distils Stable Diffusion and SD3 teachers, not {FAMILIES[info.family].name}")
    # what decides the students: a rerun with these settings continues the folder, others are refused
    identity = dict(teacher=teacher_path, seed=cfg.seed, guidance=cfg.guidance, distill_prompts=cfg.distill_prompts,
                    distill=cfg.distill)
    folder = OutputFolder(cfg.out, "demo", identity, overwrite=overwrite, resumable=True)
    out = folder.final
    pool = heldout_prompts(EVAL_POOL, seed=cfg.seed)
    prompts = pool[: cfg.num_prompts]
    prompts_file = out / f"distill_prompts-{cfg.distill_prompts}-seed{cfg.seed}.txt"
    configs = {kind: [student_config(cfg, kind, s, teacher_path, prompts_file, info.family) for s in range(cfg.train_seeds)]
               for kind in cfg.students}
    todo = [c for group in configs.values() for c in group if not (folder.resuming and finished(c))]  # checked before writing
    lacking = [c.out for group in configs.values() for c in group if cfg.eval_every and c not in todo
               and not (Path(c.out) / "eval.jsonl").is_file()]
    if lacking:
        raise LoopfreeError(f"{lacking[0]} was trained without --eval-every: its learning curve needs another --out")
    with folder:
        return _train_and_score(cfg, folder.final, teacher_path, info, configs, todo, prompts, pool, prompts_file)


class RowScorer:
    """The demo's evaluation: its jobs (prompts × images, per-image seeds) and their scores as ``loopfree eval
    --features toy`` computes them. Called as ``(pipe, step)`` it is distillation's learning-curve hook. Picklable:
    the classifier and the real images' features are built on first use, in whichever process scores."""

    def __init__(self, pool: list[str], num_prompts: int, images_per_prompt: int, seed: int, size: int, domain: str = "base"):
        self.jobs = plan_jobs(pool, list(range(num_prompts)), images_per_prompt, seed)  # as `loopfree eval --features toy`
        self.aligned, self.seed, self.size, self.domain = [j.prompt for j in self.jobs], seed, size, domain
        self._reference: tuple | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reference": None}

    def scores(self, images: np.ndarray, metrics: tuple[str, ...] = ("fid", "pr", "dc")) -> dict[str, float]:
        """Scores of ``images`` (uint8, one per job)."""
        if self._reference is None:
            extractor = ToyExtractor()
            self._reference = extractor, extractor.outputs(real_reference(self.aligned, self.seed, self.domain))
        extractor, real = self._reference
        fake = extractor(images)
        return {**toy_scores(fake, self.aligned, real, self.domain), **distribution_scores(real["features"], fake["features"], metrics)}

    def row(self, pipe, sampling: Sampling) -> tuple[dict[str, float], np.ndarray]:
        """A table row's scores (with the UNet's ms per image) and its images."""
        pipe.set_progress_bar_config(disable=True)
        images, ms = sample_images(pipe, self.jobs, sampling)
        return {**self.scores(images), "unet_ms_per_image": ms}, images

    def one_pass(self, pipe) -> Sampling:
        """A student's sampling: one pass with its recorded decoder timesteps (σ's), no guidance."""
        return Sampling(self.size, self.size, "loop_free", decoder_count(pipe), None, 1.0)

    def __call__(self, pipe, step: int) -> dict[str, float]:
        """The EMA student's scores during distillation (``eval.jsonl``): the rows' images, fd alone of the
        distribution scores."""
        pipe.set_progress_bar_config(disable=True)
        return self.scores(sample_images(pipe, self.jobs, self.one_pass(pipe))[0], ("fid",))


def teacher_sampler(family: str) -> str:
    """The name of a teacher's own loop, as its table rows give it: SD3's Euler, else DDIM."""
    return "Euler" if family == "sd3" else "DDIM"


def decoder_count(pipe) -> int:
    """K: how many decoder steps a student pipeline recorded (timesteps, or an SD3 student's σ's)."""
    return len(getattr(pipe, "decoder_sigmas", None) or pipe.decoder_timesteps)


def _worker_started(counter) -> None:
    with counter.get_lock():
        position, counter.value = counter.value, counter.value + 1
    os.environ["TQDM_POSITION"] = str(position)  # one progress line per worker
    torch.set_num_threads(1)


def teacher_row(teacher_path: str, sampling: Sampling, scorer: RowScorer) -> tuple[dict[str, float], np.ndarray]:
    """One teacher row: its scores and images."""
    return scorer.row(load_pipeline(teacher_path), sampling)


def train_run(config: DistillConfig, curve: RowScorer | None) -> None:
    """Distil ``config`` (its teacher pairs made already: :func:`prepare_teacher_pairs`), resuming where it stopped."""
    distill(dataclasses.replace(config, resume="auto"), curve)


def student_row(config: DistillConfig, to_train: bool, scorer: RowScorer, curve: RowScorer | None) -> tuple[dict[str, float], np.ndarray]:
    """One student run's row: distilled first if ``to_train``, then sampled in one pass."""
    if to_train:
        train_run(config, curve)
    student = load_student(config)
    scores, images = scorer.row(student, scorer.one_pass(student))
    timing = json.loads((Path(config.out) / "timing.json").read_text())  # summed over the run's sessions
    return {**scores, "train_seconds": timing["train_seconds"]}, images


def side_by_side(calls: list[tuple[Callable, tuple]], desc: str = "rows") -> list:
    """``fn(*args)`` of every call, each with one torch thread: on worker processes, one per thread and taken in
    order as workers free up (the toy UNet's small kernels use two cores better as two processes than as two
    threads), else one after another here. Every call is seeded by its arguments alone, so the results do not
    depend on the number of threads (tested), and ``loopfree eval --threads 1`` reproduces a row bit for bit."""
    workers = min(len(calls), torch.get_num_threads())
    with tqdm(total=len(calls), desc=desc, position=workers if workers > 1 else None) as bar:
        if workers < 2:
            results = []
            with cpu_threads(1):
                for fn, args in calls:
                    results.append(fn(*args))
                    bar.update()
            return results
        context = multiprocessing.get_context("spawn")
        counter = context.Value("i", 0)
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_started, initargs=(counter,)) as pool:
            futures = [pool.submit(fn, *args) for fn, args in calls]
            try:
                for future in as_completed(futures):
                    future.result()  # a failure stops the calls not yet started
                    bar.update()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
            return [f.result() for f in futures]


def _train_and_score(cfg: DemoConfig, out: Path, teacher_path: str, info, configs: dict, todo: list, prompts: list[str],
                     pool: list[str], prompts_file: Path) -> list[dict]:
    size = info.default_size
    scorer = RowScorer(pool, len(prompts), cfg.images_per_prompt, cfg.seed, size)
    curve = scorer if cfg.eval_every else None
    started = time.monotonic()
    if not prompts_file.is_file():
        write_atomic(prompts_file, "\n".join(training_prompts(cfg.distill_prompts, pool, cfg.seed)) + "\n")
    for config in todo:  # the teacher pairs of the regression term, once, with every thread
        prepare_teacher_pairs(config)
    pairs_s = time.monotonic() - started

    # -- rows: the teacher's (with guidance; the propagate row, UNets only: the same DDIM steps with Faster Diffusion's
    # default key steps, the decoder alone elsewhere), then one per student kind and training seed (one pass, its
    # recorded timesteps, no guidance). Students still to train go first, the costliest (most decoders) first, so the
    # teacher rows fill the worker that the cheaper student frees.
    sampler = teacher_sampler(info.family)
    teacher_rows = {f"teacher {cfg.teacher_steps}-step {sampler}": Sampling(size, size, "loop", cfg.teacher_steps, None, cfg.guidance)}
    if info.family == "sd":
        teacher_rows[f"teacher {cfg.teacher_steps}-step propagate"] = Sampling(size, size, "propagate", cfg.teacher_steps, None, cfg.guidance)
    teacher_rows[f"teacher 4-step {sampler}"] = Sampling(size, size, "loop", 4, None, cfg.guidance)
    students = {(kind, c.out): c for kind, group in configs.items() for c in group}
    calls = {name: (teacher_row, (teacher_path, sampling, scorer)) for name, sampling in teacher_rows.items()}
    calls |= {key: (student_row, (c, c in todo, scorer, curve)) for key, c in students.items()}
    decoders = {key: c.steps if c.student == "tiue" else 1 for key, c in students.items() if c in todo}  # to train
    order = sorted(calls, key=lambda key: decoders.get(key, 0), reverse=True)  # stable: the rest keep the table's order
    results = dict(zip(order, side_by_side([calls[key] for key in order])))

    names, rows, grid_rows = [], [], []
    for name in teacher_rows:
        names.append(name)
        rows.append(summarise(name, [results[name][0]]))
        grid_rows.append(results[name][1])
    for kind, group in configs.items():
        names.append(STUDENTS[kind][0])
        rows.append(summarise(names[-1], [results[kind, c.out][0] for c in group]))
        grid_rows.append(results[kind, group[0].out][1])  # the grid shows the first training seed
    grid_rows = [[Image.fromarray(im) for im in images[:: cfg.images_per_prompt][:GRID_COLUMNS]] for images in grid_rows]
    runs = {kind: [Path(c.out) for c in group] for kind, group in configs.items()}

    # -- outputs
    shown_prompts = [parse_prompt(p) for p in prompts[:GRID_COLUMNS]]
    columns = [f"{a.size} {a.colour} {a.shape}, {a.position}, {a.background}" for a in shown_prompts]
    save_image(out / "grid.png", image_grid(grid_rows, names, columns, scale=GRID_SCALE))
    if cfg.eval_every:
        curves = {STUDENTS[kind][0]: seed_curves([d / "eval.jsonl" for d in dirs]) for kind, dirs in runs.items()}
        write_json(out / "curves.json", {"eval_every": cfg.eval_every, "students": curves})
        teachers = {row["name"]: {**row, "accuracy": float(np.mean(list(row["per_attribute_accuracy"].values())))}
                    for row in rows[: len(teacher_rows)]}
        plot_curves(curves, teachers, out / "curves.png")
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    timing = {"name": "timing", "wall_s": time.monotonic() - started, "pairs_s": pairs_s, "threads": torch.get_num_threads(),
              "trained": len(todo)}  # this command's seconds: teacher pairs (cached after), then the rows side by side
    write_json(out / "metrics.json", {"rows": rows, "timing": timing, "settings": dict(settings, teacher=teacher_path),
                                      "prompts": prompts})
    return rows
