"""``loopfree eval``: generate (resumable, shared among ``accelerate launch`` processes), then score on the main one.

    run_eval(EvalConfig(out="evals/toy-student", features="toy", images_per_prompt=16))

Every process checks the options alike (model, size, prompts: the same one-line error everywhere); the main
process then checks what only it needs (weights hashes, the output folder, the feature networks, the reference),
takes the folder's lock and tells the others which images are missing. Each process generates its share, and after
a barrier the main process measures latency, extracts features (cached, see :mod:`.reference`) and writes
``results.json`` / ``results.md``. The output folder's identity is what decides the images (model and its weights'
hashes, prompts, subset, seeds, sampling with its key steps, dtype): the same command resumes, other settings are refused.
"""

from __future__ import annotations

import os

import hashlib
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from loopfree.utils.errors import LoopfreeError
from loopfree.evaluation.features import InceptionExtractor, extract, file_sha256, find_images, image_batches
from loopfree.evaluation.generation import Job, Sampling, generate, missing, plan_jobs, write_manifest
from loopfree.evaluation.prompts import PromptSource, prompt_source
from loopfree.evaluation.reference import FeatureCache, cache_key, files_fingerprint
from loopfree.evaluation.results import versions, write_results
from loopfree.evaluation.settings import PRDC_K, EvalConfig

IMAGES, REFERENCE_IMAGES = "images", "reference-images"


@dataclass
class Plan:
    """What every process derives alike from the options."""

    cfg: EvalConfig
    out: Path
    model: str
    source: PromptSource
    indices: list[int]
    jobs: list[Job]
    sampling: Sampling
    reference_sampling: Sampling | None
    device: torch.device
    dtype: torch.dtype


@dataclass
class Setup:
    """What the main process holds for scoring."""

    pipe: Any
    steps: dict
    weights: dict[str, str]
    extractor: Any = None
    clip: Any = None
    reference: dict | None = None  # what, description, and paths (images) or folder (model)


def weights_hashes(folder: str) -> dict[str, str]:
    """sha256 of every safetensors file of a model folder, by relative path."""
    root = Path(folder)
    return {p.relative_to(root).as_posix(): file_sha256(p) for p in sorted(root.rglob("*.safetensors"))}


def _inspect(flag: str, path: str, height: int | None = None, width: int | None = None, **adapters):
    from loopfree.pipelines.loading import inspect_pipeline

    try:
        info = inspect_pipeline(path, transformers=True, **adapters)
        info.check_size(height or info.default_size, width or info.default_size)
        return info
    except LoopfreeError as e:
        raise LoopfreeError(f"{flag}: {e}") from None


def resolve(cfg: EvalConfig, device: torch.device) -> Plan:
    """Check the options every process can check, and derive the jobs (no weights loaded, nothing written)."""
    from loopfree.utils.devices import resolve_dtype
    from loopfree.toy.assets import model_folder

    model = os.path.abspath(model_folder(cfg.model))
    info = _inspect("--model", model, *(cfg.resolution or (None, None)), lora=cfg.lora, fuse=cfg.fuse, style_lora=cfg.style_lora)
    height, width = cfg.resolution or (info.default_size, info.default_size)
    info.plan_steps(cfg.mode, cfg.steps, cfg.timesteps, cfg.key_steps)  # mode, steps, timesteps, key steps checked from the configs
    if cfg.tiny_vae is not None:
        from loopfree.pipelines.loading import check_tiny_vae

        check_tiny_vae(cfg.tiny_vae)
    source = prompt_source(cfg.prompts, cfg.prompt_field, cfg.seed)
    indices = source.select(cfg.num_prompts, cfg.seed)
    if cfg.features == "toy":
        from loopfree.toy.world import parse_prompt

        for p in indices:
            parse_prompt(source.prompts[p])
    jobs = plan_jobs(source.prompts, indices, cfg.images_per_prompt, cfg.seed)
    if {"pr", "dc"} & set(cfg.metrics) and len(jobs) <= PRDC_K:
        raise LoopfreeError(f"precision/recall and density/coverage use {PRDC_K} nearest neighbours: generate more than {PRDC_K} images")
    if {"fid", "kid"} & set(cfg.metrics) and len(jobs) < 2:
        raise LoopfreeError("FID and KID need at least 2 images")
    reference_sampling = None
    if cfg.reference_model:
        _inspect("--reference-model", cfg.reference_model, height, width)
        reference_sampling = Sampling(height, width, "loop", cfg.reference_steps, None, cfg.reference_guidance)
    sampling = Sampling(height, width, cfg.mode, cfg.steps, cfg.timesteps, cfg.guidance, cfg.key_steps)
    return Plan(cfg, Path(os.path.abspath(cfg.out)), model, source, indices, jobs, sampling, reference_sampling, device,
                resolve_dtype(cfg.dtype, device))


def _load(path: str, plan: Plan, evaluated: bool = False):
    """The pipeline at ``path``; ``evaluated``: the model under evaluation, with its tiny VAE and LoRAs."""
    from loopfree.pipelines.loading import load_pipeline

    c = plan.cfg
    own = dict(tiny_vae=c.tiny_vae, lora=c.lora, fuse=c.fuse, style_lora=c.style_lora, style_scale=c.style_scale) if evaluated else {}
    pipe = load_pipeline(path, dtype=plan.dtype, **own).to(plan.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def identity(plan: Plan, weights: dict[str, str]) -> dict:
    """The output folder's settings: exactly what decides the images."""
    c, s = plan.cfg, plan.sampling
    lora = {"lora": os.path.abspath(c.lora), "fuse": c.fuse} if c.lora else {}  # only when given: older folders still match
    if c.style_lora:
        lora |= {"style_lora": os.path.abspath(c.style_lora), "style_scale": c.style_scale, "fuse": c.fuse}
    return dict(model=plan.model, **lora, weights=weights, prompts=plan.source.name, prompts_sha256=plan.source.sha256, num_prompts=c.num_prompts,
                images_per_prompt=c.images_per_prompt, seed=c.seed, height=s.height, width=s.width, steps=c.steps,
                timesteps=c.timesteps, mode=c.mode, key_steps=c.key_steps, guidance=c.guidance, dtype=c.dtype,
                tiny_vae=c.tiny_vae and os.path.abspath(c.tiny_vae))


def _reference(plan: Plan, extractor) -> dict | None:
    """What the generated images are compared with, and the cache description of its features."""
    cfg = plan.cfg
    if not cfg.needs_reference:
        return None
    network = dict(kind=extractor.kind, network=extractor.sha256, resolution=extractor.resolution)
    if cfg.reference_images:
        paths = find_images(cfg.reference_images)
        root = Path(cfg.reference_images)
        return dict(what=f"{len(paths)} images in {root.absolute()}", paths=paths,
                    description=dict(set="images", files=files_fingerprint(paths, root), **network))
    if cfg.reference_model:
        model = os.path.abspath(cfg.reference_model)
        jobs = hashlib.sha256(repr([(j.prompt, j.seed) for j in plan.jobs]).encode()).hexdigest()
        description = dict(set="model", model=model, weights=weights_hashes(model), jobs=jobs,
                           sampling=plan.reference_sampling.description(), dtype=cfg.dtype, **network)
        folder = plan.out / REFERENCE_IMAGES / cache_key(description)
        return dict(what=f"{model}, {cfg.reference_steps}-step DDIM loop, guidance {cfg.reference_guidance:g}", folder=folder,
                    description=description)
    return dict(what=f"real toy-world images of the same prompts (seed {cfg.seed})", toy=True, description=None)


def _missing_indices(folder: Path, jobs: list[Job]) -> list[int]:
    absent = set(missing(folder, jobs))
    return [k for k, job in enumerate(jobs) if job in absent]


def setup(plan: Plan, stack: ExitStack) -> tuple[Setup, tuple]:
    """Main process: check the rest, open the output folder, plan the missing images (returned for all processes)."""
    from loopfree.utils.outputs import OutputFolder

    cfg = plan.cfg
    weights = weights_hashes(plan.model)
    if cfg.lora:  # the adapter's files beside the base's
        weights |= {f"lora/{k}": v for k, v in weights_hashes(cfg.lora).items()}
    if cfg.style_lora:
        from loopfree.pipelines.loading import style_weights

        weights["style_lora"] = file_sha256(style_weights(cfg.style_lora))
    folder = OutputFolder(cfg.out, "eval", identity(plan, weights), overwrite=cfg.overwrite, resumable=True)
    extractor = None
    if cfg.needs_reference or "alignment" in cfg.metrics:
        if cfg.features == "toy":
            from loopfree.evaluation.toy import ToyExtractor

            extractor = ToyExtractor()
        else:
            extractor = InceptionExtractor(cfg.inception, cfg.metric_resolution, plan.device)
    clip = None
    if "clip" in cfg.metrics:
        from loopfree.evaluation.clip import ClipScorer

        clip = ClipScorer(cfg.clip, plan.device)
    reference = _reference(plan, extractor)
    pipe = _load(plan.model, plan, evaluated=True)
    steps = pipe.plan_steps(cfg.mode, cfg.steps, cfg.timesteps, cfg.key_steps)
    stack.enter_context(folder)  # the lock, the marker: from here on the folder is ours
    images = plan.out / IMAGES
    images.mkdir(exist_ok=True)
    write_manifest(images, plan.jobs)
    todo = _missing_indices(images, plan.jobs)
    reference_todo, reference_folder = [], None
    if reference and reference.get("folder") and FeatureCache(plan.out).find(cache_key(reference["description"])) is None:
        reference_folder = reference["folder"]
        reference_folder.mkdir(parents=True, exist_ok=True)
        write_manifest(reference_folder, plan.jobs)
        reference_todo = _missing_indices(reference_folder, plan.jobs)
    held = Setup(pipe, dict(steps=steps.num_steps, timesteps=steps.timesteps, key_steps=steps.key_steps), weights, extractor, clip, reference)
    return held, (todo, reference_folder and str(reference_folder), reference_todo)


def on_main(state, fn: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any]:
    """``fn()`` on the main process; its second value reaches every process, and so does its failure (a
    LoopfreeError as itself, anything else as a LoopfreeError on the other processes, re-raised on the main one)."""
    held, shared, error, failure = None, None, None, None
    if state.is_main_process:
        try:
            held, shared = fn()
        except LoopfreeError as e:
            error = str(e)
        except BaseException as e:  # the others must not wait for a main process that is gone
            failure, error = e, f"the main process failed ({e.__class__.__name__}: {e})"
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error, shared = broadcast_object_list([error, shared])
    if failure is not None:
        raise failure
    if error is not None:
        raise LoopfreeError(error)
    return held, shared


def _score(plan: Plan, held: Setup) -> dict:
    """Latency, features (cached), metrics; the results written to the folder."""
    from loopfree.evaluation.latency import measure_latency
    from loopfree.evaluation.scores import distribution_scores

    cfg, out, extractor = plan.cfg, plan.out, held.extractor
    metrics: dict[str, Any] = {}
    if "latency" in cfg.metrics:
        metrics.update(measure_latency(held.pipe, plan.jobs[0].prompt, cfg.seed, plan.sampling, plan.device, cfg.latency_repeats))
    cache, prompts = FeatureCache(out), [j.prompt for j in plan.jobs]
    files = [out / IMAGES / j.file for j in plan.jobs]
    resolution = extractor.resolution if extractor else cfg.metric_resolution
    networks = dict(kind=extractor and extractor.kind, network=extractor and extractor.sha256, clip=held.clip and held.clip.sha256)
    fake = {}
    if extractor is not None or held.clip is not None:
        fake, _ = cache.get(dict(set="generated", files=files_fingerprint(files, out), resolution=resolution, **networks),
                            lambda: extract(extractor, image_batches(files, resolution, "features"), held.clip, prompts))
    reference, real, where = held.reference, None, None
    if reference and reference.get("toy"):
        from loopfree.evaluation.toy import real_reference

        real = extractor.outputs(real_reference(prompts, cfg.seed))
    elif reference:
        paths = reference.get("paths") or [reference["folder"] / j.file for j in plan.jobs]
        real, where = cache.get(reference["description"], lambda: extract(extractor, image_batches(paths, resolution, "reference features")))
    if real is not None:
        found = distribution_scores(real["features"], fake["features"], cfg.metrics, seed=cfg.seed, device=plan.device)
        metrics.update({("fid" if k == "fd" and cfg.features == "inception" else k): v for k, v in found.items()})
        metrics["n_reference_images"] = len(real["features"])
    if held.clip is not None:
        metrics.update(clip_score=float(fake["clip"].mean()), clip_score_std=float(fake["clip"].std()))
    if "alignment" in cfg.metrics:
        from loopfree.evaluation.toy import toy_scores

        metrics.update(toy_scores(fake, prompts, real if reference and reference.get("toy") else None))
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
    results = dict(
        model=plan.model, settings=dict(settings, model=plan.model, prompts=plan.source.name, height=plan.sampling.height, width=plan.sampling.width),
        sampling=held.steps, metrics=metrics, images=len(plan.jobs), prompts=len(plan.indices), prompts_sha256=plan.source.sha256,
        weights=held.weights, features=dict(kind=cfg.features, resolution=resolution, network=extractor and getattr(extractor, "path", "shipped toy classifier"),
                                            sha256=extractor and extractor.sha256),
        clip=held.clip and dict(path=held.clip.path, sha256=held.clip.sha256),
        reference=reference and dict(what=reference["what"], description=reference["description"], features=where),
        device=str(plan.device), versions=versions(),
    )
    write_results(out, results)
    return results


def run_eval(cfg: EvalConfig) -> dict | None:
    """Generate and score; the results on the main process (None on the others)."""
    from accelerate import PartialState

    from loopfree.utils.devices import resolve_device

    state = PartialState(cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()))
    device = state.device if state.num_processes > 1 else resolve_device(cfg.device)
    plan = resolve(cfg, device)
    with ExitStack() as stack:
        held, (todo, reference_folder, reference_todo) = on_main(state, lambda: setup(plan, stack))
        rank, world = state.process_index, state.num_processes
        if todo:
            pipe = held.pipe if held else _load(plan.model, plan, evaluated=True)
            generate(pipe, plan.out / IMAGES, [plan.jobs[k] for k in todo], plan.sampling, cfg.batch_size, device, rank, world)
        if reference_todo:
            generate(_load(os.path.abspath(cfg.reference_model), plan), Path(reference_folder), [plan.jobs[k] for k in reference_todo],
                     plan.reference_sampling, cfg.batch_size, device, rank, world, desc="generate reference")
        state.wait_for_everyone()
        return _score(plan, held) if state.is_main_process else None
