"""``loopfree distill``: distil a teacher into a TiUE (or one-step) student from text prompts alone (SPEC §3).

    loopfree distill --teacher path/to/sd21-base --prompts prompts.txt --out runs/tiue --max-steps 20000
    accelerate launch --multi_gpu --num_processes 8 -m loopfree distill --config distill.yaml

The loop: prompts → conditioning → :meth:`Distiller.step` (objective: :mod:`loopfree.method.objective`), with
checkpoints (:mod:`loopfree.training.checkpoint`), SIGTERM/SIGINT handling, validation grids and logging. ``--out``
follows :class:`~loopfree.utils.outputs.OutputFolder`: a run is continued only with ``--resume`` and the settings
that decide it; a changed one is refused by name, harmless ones (run length, logging, …) are recorded.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import socket
import sys
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from loopfree.training.checkpoint import STATE, find_checkpoint, save_checkpoint
from loopfree.training.config import DistillConfig, save_config
from loopfree.training.data import PromptStream, load_prompts
from loopfree.training.distiller import Batch, Distiller
from loopfree.training.pairs import pair_prompts, teacher_pairs
from loopfree.training.prompt_encoder import PromptEncoder
from loopfree.training.student_lora import publish_student_lora
from loopfree.utils.devices import tf32
from loopfree.utils.errors import Interrupted, LoopfreeError
from loopfree.utils.seeding import derive_seed, preserved_rng
from loopfree.utils.signals import stop_on_signals
from loopfree.utils.images import image_grid
from loopfree.pipelines.card import write_card
from loopfree.pipelines.clip import check_clip
from loopfree.pipelines.loading import check_tiny_vae, inspect_pipeline, load_pipeline
from loopfree.utils.outputs import OutputFolder, changed_keys, save_image, write_json
from loopfree.method.sampler import Conditioning

#: Options that may change when a run is resumed: they don't alter what it computes (recorded in resumes.jsonl).
HARMLESS = ("max_steps", "checkpoint_every", "checkpoints_total_limit", "resume", "overwrite", "validate_every", "eval_every",
            "validation_prompts", "log_with", "save_ema", "cache_prompt_embeds", "batch_teacher_fake",
            "gradient_checkpointing", "regression_cache", "prompt_cache_mb")


def run_identity(cfg: DistillConfig) -> dict:
    """The settings that decide a run's result (paths absolute, so a folder means the same from anywhere); the run
    length too when a learning rate or the CLIP weight decays to 0 at it."""
    decays = (cfg.lr_schedule != "constant" or cfg.lr_fake_schedule != "constant"
              or (cfg.clip_margin > 0 and cfg.clip_weight_steps is None))
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if (k not in HARMLESS or (k == "max_steps" and decays)) and k != "out"}
    paths = {k: os.path.abspath(values[k]) for k in ("student_init", "clip", "tiny_vae") if values[k]}
    return {**values, **paths, "teacher": os.path.abspath(cfg.teacher), "prompts": os.path.abspath(cfg.prompts)}


def check_inputs(cfg: DistillConfig) -> tuple[int, list[str], OutputFolder, Path | None]:
    """Everything that can be wrong with the user's input, checked before anything is loaded or written; the
    image size, the prompts, the output folder and the (verified) checkpoint to resume from."""
    try:
        info = inspect_pipeline(cfg.teacher, transformers=True)
    except LoopfreeError as e:
        raise LoopfreeError(f"teacher: {e}") from None
    if info.family == "sd3":  # what an SD3 student does not have yet, refused before anything loads
        unbuilt = {"--student-init": cfg.student_init, "--clip-margin": cfg.clip_margin > 0}
        for flag, given in unbuilt.items():
            if given:
                raise LoopfreeError(f"{flag} is not built for an SD3 (rectified-flow) teacher yet")
        if cfg.timesteps is not None:
            raise LoopfreeError("a rectified-flow teacher's student is planned by --steps (decoder sigmas), not --timesteps")
    elif info.family != "sd":
        raise LoopfreeError(f"teacher: a {info.family} teacher's distillation is not built yet (SD and SD3 teachers are)")
    elif cfg.shared_blocks is not None:
        raise LoopfreeError("--shared-blocks is a transformer student's setting; a UNet's encoder is its shared part")
    if cfg.student_init:
        try:
            student = inspect_pipeline(cfg.student_init)
        except LoopfreeError as e:
            raise LoopfreeError(f"--student-init: {e}") from None
        def unet_config(root: Path) -> dict:
            return {k: v for k, v in json.loads((root / "unet" / "config.json").read_text()).items() if not k.startswith("_")}

        if unet_config(student.path) != unet_config(info.path):
            raise LoopfreeError(f"--student-init {cfg.student_init} is not a student of this teacher's UNet (its config differs)")
    if cfg.clip_margin > 0:
        check_clip(cfg.clip, "--clip-margin")
        try:
            check_tiny_vae(cfg.tiny_vae)
        except LoopfreeError as e:
            raise LoopfreeError(f"--tiny-vae: {e}") from None
    prompts = load_prompts(cfg.prompts, cfg.prompt_field).prompts
    resolution = cfg.resolution or info.default_size
    try:
        info.check_size(resolution, resolution)
    except LoopfreeError as e:
        raise LoopfreeError(f"--resolution: {e}") from None
    if cfg.dtype == "fp16" and not torch.cuda.is_available():
        raise LoopfreeError("fp16 mixed precision needs a CUDA device; use --dtype bf16 on a CPU")
    if cfg.log_with == "wandb" and importlib.util.find_spec("wandb") is None:
        raise LoopfreeError("--log-with wandb needs the wandb package: pip install wandb")
    out = Path(cfg.out)
    if cfg.resume and cfg.overwrite:
        raise LoopfreeError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    folder = OutputFolder(out, "distill", run_identity(cfg), overwrite=cfg.overwrite, resumable=True)
    if folder.resuming and cfg.resume is None:
        raise LoopfreeError(f"--out {cfg.out} holds a distillation with these settings: pass --resume latest to continue it "
                            "or --overwrite to start again")
    checkpoint = find_checkpoint(out, cfg.resume) if cfg.resume else None
    if checkpoint is not None:
        state = json.loads((checkpoint / STATE).read_text())
        changed = changed_keys(state["identity"], run_identity(cfg))
        if changed:
            raise LoopfreeError(f"checkpoint {checkpoint} was made with other settings ({', '.join(changed)}): they would alter the run")
    return resolution, prompts, folder, checkpoint


#: (student pipeline, step) -> scores; called every ``eval_every`` steps (learning curves) on the main process — on
#: every process of a sharded run, whose sampling is collective (the same calls everywhere; the main one's scores kept)
Evaluation = Callable[[object, int], dict[str, float]]


def distill(cfg: DistillConfig, evaluate: Evaluation | None = None) -> Path:
    """Run the whole distillation described by ``cfg``; returns the folder of the final pipeline. With
    ``evaluate`` and ``cfg.eval_every``, the EMA student is scored along the way (``eval.jsonl``)."""
    resolution, prompts, folder, checkpoint = check_inputs(cfg)
    with preserved_rng():
        acc = Accelerator(
            cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),  # CPU data parallel uses gloo
            mixed_precision=cfg.mixed_precision,
            log_with=None if cfg.log_with == "none" else cfg.log_with,
            project_config=ProjectConfiguration(project_dir=str(folder.final), logging_dir=str(folder.final / "logs")),
        )
        if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise LoopfreeError(f"accelerate's {acc.distributed_type.value} plugin is not used: launch with --multi_gpu (or torchrun) "
                                "and pass --shard for FSDP2 sharding of the student (docs/distill.md)")
        if cfg.shard and acc.num_processes < 2:
            raise LoopfreeError("--shard splits the student across processes: launch several (torchrun --nproc_per_node N, "
                                "or accelerate launch --multi_gpu --num_processes N)")
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != acc.num_processes:
            raise LoopfreeError(f"launched as {launched} processes but accelerate runs {acc.num_processes}: check the launch configuration")
        acc.wait_for_everyone()  # every process has checked --out before the main one writes to it
        with folder if acc.is_main_process else nullcontext(), tf32(cfg.allow_tf32):
            return _train(cfg, acc, folder.final, resolution, prompts, checkpoint, evaluate)


def _train(cfg: DistillConfig, acc: Accelerator, out: Path, resolution: int, prompts: list[str], checkpoint: Path | None,
           evaluate: Evaluation | None) -> Path:
    main = acc.is_main_process
    if acc.is_local_main_process:  # one line per node: which processes run where, and where the run's files go
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        ranks = f"{acc.process_index}–{acc.process_index + local - 1}" if local > 1 else f"{acc.process_index}"
        print(f"{socket.gethostname()}: process {ranks} of {acc.num_processes} on {acc.device.type}; checkpoints and "
              f"logs in {out} (process 0 writes them)", file=sys.stderr, flush=True)
    # -- models: same initial weights on every process, then a different random stream per process
    set_seed(cfg.seed)
    pipe = load_pipeline(cfg.teacher)
    for name in ("text_encoder", "text_encoder_2", "vae"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).requires_grad_(False).to(acc.device)
    encode = PromptEncoder(pipe, acc.device, resolution, cfg.prompt_cache_mb if cfg.cache_prompt_embeds else 0)
    latent_shape = (pipe.denoiser.config.in_channels, resolution // pipe.vae_scale_factor, resolution // pipe.vae_scale_factor)
    pairs = None  # every process makes its share of the teacher's pairs, before the fake score's LoRA joins its UNet
    if cfg.regression_weight > 0:
        pairs = teacher_pairs(cfg, pipe.denoiser, pipe.scheduler, prompts, encode, latent_shape, acc.device,
                              acc.process_index, acc.num_processes)
    init = None
    if cfg.student_init:
        student = load_pipeline(cfg.student_init)
        init = student.unet, student.decoder_timesteps
    distiller = Distiller(cfg, pipe.denoiser, pipe.scheduler, acc, resolution // pipe.vae_scale_factor, init)
    set_seed(cfg.seed, device_specific=True)
    stream = PromptStream(prompts, cfg.batch_size, cfg.seed, acc.process_index, acc.num_processes)

    def pair_batch() -> tuple[Conditioning, torch.Tensor, torch.Tensor] | None:
        """B teacher pairs drawn at random (the global, checkpointed RNG), read from the cache on disk."""
        if pairs is None:
            return None
        index = torch.randint(pairs.count, (cfg.batch_size,)).tolist()
        x_T, x0 = (x.to(acc.device) for x in pairs.rows(index))
        return encode(pair_prompts(prompts, index))[0], x_T, x0

    validation_prompts = cfg.validation_prompts or prompts[:4]

    # -- resume: weights, optimisers, RNG states (accelerate), EMA, data position, step
    step, seconds = 0, 0.0  # seconds: time in training steps, summed over the run's sessions (timing.json)
    if checkpoint is not None:
        state = json.loads((checkpoint / STATE).read_text())
        acc.load_state(str(checkpoint), load_kwargs={"weights_only": True})
        distiller.load_weights(checkpoint, state["ema_step"])
        stream.load_state_dict(state["stream"])
        step = distiller.iteration = state["step"]
        seconds = state["train_seconds"]
        processes = state["num_processes"], acc.num_processes
        if processes[0] != processes[1]:  # the saved RNG states were per process: new ones (docs/distill.md)
            set_seed(derive_seed(cfg.seed, step, acc.process_index, bits=32))
            if main:
                print(f"resuming {checkpoint.name} of {processes[0]} processes with {processes[1]}: the prompt stream goes "
                      "on from its global position, each process on a new random stream", file=sys.stderr, flush=True)
        if main:
            record_changes(out, state["config"], cfg, step, processes)
    if main:
        save_config(cfg, out / "distill_config.yaml")
    if cfg.log_with != "none":
        acc.init_trackers("loopfree", config={k: str(v) for k, v in dataclasses.asdict(cfg).items()})

    def checkpoint_now() -> None:
        state = {"stream": stream.state_dict(), "ema_step": distiller.ema.optimization_step, "train_seconds": seconds,
                 "identity": run_identity(cfg), "config": dataclasses.asdict(cfg)}
        save_checkpoint(acc, distiller, out, step, state, cfg.checkpoints_total_limit)

    def score_now() -> None:
        if not (evaluate and cfg.eval_every and step % cfg.eval_every == 0):
            return

        def score(unet) -> dict[str, float]:
            with torch.random.fork_rng(devices=[acc.device] if acc.device.type == "cuda" else []):  # the evaluation's draws leave the training stream alone
                return evaluate(student_pipeline(pipe, distiller, unet), step)

        scores = distiller.with_student(score, ema=True)  # every process: a sharded student samples collectively
        if not main:
            return
        acc.log({f"eval/{k}": v for k, v in scores.items()}, step=step)
        with open(out / "eval.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **scores}) + "\n")

    if checkpoint is None:
        score_now()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="distill", unit="step", disable=not main)
    t_last = time.perf_counter()
    with stop_on_signals() as stop:
        while step < cfg.max_steps:
            batches = []
            for _ in range(cfg.gradient_accumulation_steps):  # the step's micro-batches, each with its teacher pairs
                batch = stream.next_batch()
                batches.append(Batch(*encode(batch), prompts=batch, pairs=pair_batch()))
            logs = distiller.step(batches)
            step += 1
            now = time.perf_counter()
            logs["it_per_s"], t_last = 1.0 / max(now - t_last, 1e-9), now
            seconds += 1.0 / logs["it_per_s"]
            acc.log(logs, step=step)
            bar.update()
            bar.set_postfix({cfg.objective: f"{logs[f'loss/{cfg.objective}']:.3g}", "kl": f"{logs['loss/kl']:.3g}",
                             "fake": f"{logs['loss/fake_mse']:.3g}"})
            if cfg.validate_every and step % cfg.validate_every == 0:
                path = out / "validation" / f"step-{step:08d}.png"  # every process: a sharded student samples collectively
                distiller.with_student(lambda unet: validate(student_pipeline(pipe, distiller, unet), validation_prompts, path,
                                                             step, resolution, acc), ema=False)
            score_now()
            t_last = time.perf_counter()  # validation and scoring are not training time
            signum = int(acc.reduce(torch.tensor(stop.signum, device=acc.device), "max").item())
            if signum or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                checkpoint_now()
            if signum:
                bar.close()
                del distiller  # its DDP wrappers, before the process group (end_processes)
                end_processes(acc)
                raise Interrupted(f"interrupted: checkpoint saved at step {step}; continue with --resume latest", signum)
    bar.close()
    if cfg.checkpoint_every and not (out / "checkpoints" / f"checkpoint-{step:08d}").is_dir():
        checkpoint_now()
    check_replicas_agree(distiller, acc)

    # -- the final pipeline: EMA (or raw) student weights, decoder timesteps recorded
    unet = distiller.full_student(ema=cfg.save_ema)  # every process: a sharded student is gathered once, here
    if main:
        write_json(out / "timing.json", {"steps": step, "train_seconds": seconds})
        if cfg.student_lora_rank:  # the adapter in diffusers' LoRA format, for its base
            publish_student_lora(student_pipeline(pipe, distiller, unet), out, cfg.teacher)
        else:
            publish_pipeline(student_pipeline(pipe, distiller, unet), out)
        write_card(out)  # README.md: the Hub's model card, from the folder's own records
    acc.wait_for_everyone()
    del distiller  # its DDP wrappers, before the process group (end_processes)
    end_processes(acc)
    return out


def end_processes(acc: Accelerator) -> None:
    """Release the models accelerate prepared, then destroy the process group (and end the trackers). In this order:
    a DDP reducer holding the group's last reference destroys it with the GIL held, joining gloo's worker threads,
    which may still need the GIL to free the last collectives' tensors — a deadlock at exit (seen with 3 processes on
    2 cores). The group's own Python object releases the GIL when it is destroyed."""
    acc.free_memory()  # drops accelerate's references and collects the DDP wrappers' cycles
    acc.end_training()


def record_changes(out: Path, saved: dict, cfg: DistillConfig, step: int, processes: tuple[int, int]) -> None:
    """Append the harmless options that differ from the checkpoint's run, and the process counts (checkpoint's, now)
    if they differ, to ``resumes.jsonl``."""
    now = dataclasses.asdict(cfg)
    changed = {k: [saved.get(k), now[k]] for k in HARMLESS if saved.get(k) != now[k] and k not in ("resume", "overwrite")}
    if processes[0] != processes[1]:
        changed["num_processes"] = list(processes)
    with open(out / "resumes.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changed": changed}) + "\n")


def check_replicas_agree(distiller: Distiller, acc: Accelerator) -> None:
    """Data-parallel replicas must hold the same weights: compare a checksum of the student (sharded: of the fake
    score's LoRA, the replicated part) across processes."""
    what, params = ("fake-score", distiller.lora_params) if distiller.cfg.shard else ("student", distiller.student_params)
    checksum = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1)
    sums = acc.gather(checksum.to(acc.device)).cpu()
    if not torch.all(sums == sums[0]):
        raise RuntimeError(f"{what} weights differ across processes: checksums {sums.tolist()}")
    if acc.num_processes > 1 and acc.is_main_process:
        print(f"{acc.num_processes} processes hold identical {what} weights (checksum {sums[0].item():.10g})")


def student_pipeline(pipe, distiller: Distiller, unet):
    """A pipeline of the teacher's components with ``unet``, the student (:meth:`Distiller.with_student`,
    :meth:`Distiller.full_student`); a transformer student's records its decoder σ's and N."""
    if hasattr(pipe, "geometry"):  # a transformer pipeline (SD3)
        student = type(pipe)(**{**pipe.components, "transformer": unet})
        student.decoder_sigmas, student.shared_blocks = distiller.timesteps, distiller.cfg.shared_blocks
        return student
    student = type(pipe)(**{**pipe.components, "unet": unet})
    student.decoder_timesteps = distiller.timesteps
    student.final_alpha_cumprod = distiller.final_alpha_cumprod
    student.distilled_from = os.path.abspath(distiller.cfg.student_init) if distiller.cfg.student_init else None
    return student


def publish_pipeline(pipe, out: Path) -> None:
    """Save ``pipe`` into ``out`` beside the run's other files; ``model_index.json`` goes in last, so a folder
    that has it holds a whole pipeline."""
    staging = out / ".tmp-pipeline"
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging)
    (out / "model_index.json").unlink(missing_ok=True)
    for entry in sorted(staging.iterdir(), key=lambda p: p.name == "model_index.json"):
        target = out / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()


@torch.no_grad()
def validate(student, prompts: list[str], path: Path, step: int, resolution: int, acc: Accelerator, seeds: int = 4) -> None:
    """A grid of the ``student`` pipeline's samples at the training resolution: one row per prompt, one column per seed,
    written by the main process (every process of a sharded run samples)."""
    student.set_progress_bar_config(disable=True)
    rows = []
    for prompt in prompts:
        gens = [torch.Generator(acc.device).manual_seed(s) for s in range(seeds)]
        rows.append(student([prompt] * seeds, generator=gens, height=resolution, width=resolution).images)
    if not acc.is_main_process:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = image_grid(rows)
    save_image(path, grid)
    for tracker in acc.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
