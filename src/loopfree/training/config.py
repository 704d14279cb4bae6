"""Typed configuration of `loopfree distill`: defaults (paper values marked), validation, YAML loading and
saving. The command line gets one flag per field (``loopfree.cli.config_options``).

Precedence: dataclass defaults < YAML file < command-line flags actually given.
"""

import dataclasses
import difflib
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from loopfree.utils.errors import LoopfreeError, short


NUM_TRAIN_TIMESTEPS = 1000  # training timesteps of the SD teachers: t ∈ {0, ..., 999}

# Value checks referenced from field metadata: (predicate, what it requires).
_AT_LEAST_1 = (lambda v: v >= 1, "≥ 1")
_NON_NEGATIVE = (lambda v: v >= 0, "≥ 0")
_POSITIVE = (lambda v: v > 0, "> 0")
_DECAY = (lambda v: 0 <= v < 1, "in [0, 1)")
_PROBABILITY = (lambda v: 0 <= v <= 1, "in [0, 1]")
_FINITE = (lambda v: math.isfinite(v), "a finite number")
_TIMESTEP = (lambda v: 0 <= v < NUM_TRAIN_TIMESTEPS, f"in [0, {NUM_TRAIN_TIMESTEPS - 1}]")


def _opt(text: str, default: Any = dataclasses.MISSING, **metadata: Any) -> Any:
    """A dataclass field carrying its help text (also its `--help` line) and optional value check."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": text, **metadata})
    return dataclasses.field(default=default, metadata={"help": text, **metadata})


@dataclass
class DistillConfig:
    """Every option of `loopfree distill`. "paper:" marks the One-Way Ticket SD2.1-base setting (SPEC §3)."""

    # -- data and output
    teacher: str = _opt("teacher pipeline: a local diffusers directory (required)")
    prompts: str = _opt("prompts: .txt, .jsonl, .csv, .parquet or a datasets save_to_disk directory (required)")
    out: str = _opt("output directory: checkpoints, logs and the final pipeline (required)")
    prompt_field: str | None = _opt("prompt column or dotted JSON path, e.g. Task2.Caption (default: prompt)", None)
    # -- run length, checkpoints
    max_steps: int = _opt(
        "steps (paper: 3 epochs of 1,418,723 prompts at global batch 64 ≈ 66,500)", 66_500, check=_AT_LEAST_1
    )
    batch_size: int = _opt("prompts per process and step (paper: 8 per GPU, 8 GPUs)", 8, check=_AT_LEAST_1)
    resolution: int | None = _opt(
        "square image size in pixels, a multiple of the teacher's VAE factor (default: its native size; paper: 512)",
        None,
        check=_AT_LEAST_1,
    )
    seed: int = _opt("random seed for prompts, noise and timesteps", 0)
    checkpoint_every: int = _opt("resumable checkpoint every N steps and at the end (0: none; SIGTERM/SIGINT still saves one)", 1000, check=_NON_NEGATIVE)
    checkpoints_total_limit: int | None = _opt("keep the newest N checkpoints (null: keep all)", 3, check=_AT_LEAST_1)
    resume: str | None = _opt(
        "continue the run in --out: 'latest' (its newest checkpoint; an error if there is none), 'auto' (the newest "
        "checkpoint if there is one, else start) or a checkpoint folder",
        None,
    )
    overwrite: bool = _opt("replace a run already in --out (else it is refused unless resumed)", False)
    # -- student
    student: Literal["tiue", "one-step"] = _opt("tiue (loop-free, K decoders) or one-step (SwiftBrush)", "tiue")
    student_init: str | None = _opt(
        "a distilled student folder to start the student and its EMA from instead of the teacher (fine-tuning); its "
        "recorded decoder timesteps are kept unless --steps/--timesteps ask for others",
        None,
    )
    student_lora_rank: int | None = _opt(
        "TiUE as a LoRA: the student is the frozen teacher plus a LoRA of this rank, published in diffusers' LoRA format "
        "(default: a full student, the paper's); give it a LoRA's --lr-student (the toy study's: 1e-3)", None, check=_AT_LEAST_1)
    student_lora_alpha: float | None = _opt("LoRA alpha of the student's adapter (default: its rank)", None, check=_POSITIVE)
    student_lora_targets: list[str] | None = _opt("layers given the student's LoRA, comma-separated (default: --lora-targets)", None)
    steps: int = _opt("K, the TiUE student's decoder timesteps (its sampling steps; paper: 4)", 4, check=_AT_LEAST_1)
    timesteps: list[int] | None = _opt(
        "τ_K > … > τ_1, comma-separated (default: the teacher scheduler's DDIM timesteps for K steps, "
        "e.g. 751,501,251,1 for SD2.1-base)",
        None,
        check=_TIMESTEP,
    )
    one_step_timestep: int = _opt("timestep T of the one-step student (SPEC §3: 999)", 999, check=_TIMESTEP)
    shared_blocks: int | None = _opt("a transformer student's N: its first N blocks run once, at τ_K (default: half)", None,
                                     check=_NON_NEGATIVE)
    # -- losses
    objective: Literal["vsd", "sid"] = _opt(
        "the student's score loss: vsd (paper) or sid (Score identity Distillation, gradients through both scores)", "vsd"
    )
    sid_alpha: float = _opt("SiD's α (SiD paper: 1.2)", 1.2, check=_FINITE)
    guidance: float = _opt("w_ψ, classifier-free guidance of the teacher in the student loss (paper: 4.5)", 4.5,
                           check=_NON_NEGATIVE)
    guidance_fake: float | None = _opt(
        "w_φ, guidance of the fake score in the student loss (default: --guidance, the paper's; Zero-CFG: "
        "--guidance 1 --guidance-fake 0; Anti-CFG: --guidance 1 and a negative w_φ)",
        None,
        check=_FINITE,
    )
    t_min: int = _opt("smallest timestep of the score loss (paper: 20)", 20, check=_TIMESTEP)
    t_max: int = _opt("largest timestep of the score loss (paper: 980)", 980, check=_TIMESTEP)
    regression_weight: float = _opt(
        "λ_reg of DMD's regression term on cached teacher pairs (0: off, the paper's)", 0.0, check=_NON_NEGATIVE
    )
    regression_pairs: int = _opt("teacher pairs: (training prompt, seed) → teacher DDIM x_0, made once", 512, check=_AT_LEAST_1)
    regression_steps: int = _opt("DDIM steps of the teacher pairs", 25, check=_AT_LEAST_1)
    regression_guidance: float = _opt("guidance of the teacher pairs", 4.5, check=_NON_NEGATIVE)
    regression_cache: str | None = _opt(
        "folder of the teacher-pair cache, shared by runs (default: $LOOPFREE_CACHE/pairs or ~/.cache/loopfree/pairs)", None
    )
    clip_margin: float = _opt(
        "τ of the CLIP hinge relu(τ - mean cos(text, image)) on the student's x_0 decoded by --tiny-vae (0: off, the "
        "paper's; the authors' released students were fine-tuned with 0.35, their --lambda_textcliploss)", 0.0, check=_NON_NEGATIVE
    )
    clip_weight: float = _opt(
        "w_0, the CLIP hinge's weight at step 0, falling linearly to 0 at --clip-weight-steps (authors' code: 0.1)", 0.1,
        check=_NON_NEGATIVE,
    )
    clip_weight_steps: int | None = _opt(
        "steps in which the CLIP weight falls to 0 (default: --max-steps; authors' code: one pass over their prompts at "
        "the per-device batch)", None, check=_AT_LEAST_1,
    )
    clip: str | None = _opt("local transformers CLIP folder of the CLIP loss (as `loopfree eval --clip`)", None)
    tiny_vae: str | None = _opt("local diffusers AutoencoderTiny (TAESD) folder that decodes x_0 for the CLIP loss", None)
    kl_weight: float | None = _opt(
        "λ_KL (default: 0.1 for tiue — paper, with kl_reduction=sum — and 0 for one-step, which has no KL term; "
        "with mean, 3.2 gives the paper's weight at K=4 and 8 prompts per process; 0: the w/o-KL ablation)",
        None,
        check=_NON_NEGATIVE,
    )
    kl_reduction: Literal["sum", "mean"] = _opt(
        "KL over the K·B items: sum (paper's exact form) or mean (batch-independent)", "sum"
    )
    fake_cfg_dropout: float = _opt("empty-prompt rate of the fake-score step (paper: 0.1)", 0.1, check=_PROBABILITY)
    guidance_fake_train: float = _opt(
        "κ, guidance of the fake score's prediction in its own loss: mean((sqrt(ā_t)(ε_φ^κ - ε))²), ε_φ^κ = ε_φ(∅) + "
        "κ (ε_φ(c) - ε_φ(∅)), both passes trained (1: plain ε_φ, the paper's; SiD-LSG's runs: 2, its cfg_train_fake κ_1)",
        1.0, check=_FINITE,
    )
    # -- fake score LoRA
    lora_rank: int = _opt("LoRA rank of the fake score (paper: 64)", 64, check=_AT_LEAST_1)
    lora_alpha: float = _opt("LoRA alpha of the fake score (paper: 108)", 108.0, check=_POSITIVE)
    lora_targets: list[str] = _opt("attention layers given LoRA, comma-separated (paper: to_q,to_v)", ["to_q", "to_v"])
    # -- optimisation
    lr_student: float = _opt("student learning rate (paper: 1e-6)", 1e-6, check=_POSITIVE)
    lr_fake: float = _opt("fake-score learning rate (paper: 1e-3)", 1e-3, check=_POSITIVE)
    lr_schedule: Literal["constant", "linear", "cosine"] = _opt(
        "student learning-rate decay to 0 at --max-steps, after the warm-up (paper: constant)", "constant"
    )
    lr_fake_schedule: Literal["constant", "linear", "cosine"] = _opt("fake-score learning-rate decay (paper: constant)", "constant")
    lr_warmup_steps: int = _opt("linear learning-rate warm-up of both networks from 0 (paper: none)", 0, check=_NON_NEGATIVE)
    fake_updates: int = _opt(
        "fake-score updates per student update, each on a fresh noising of the same sg(x_0) (paper: 1; DMD2: 5)",
        1,
        check=_AT_LEAST_1,
    )
    gradient_accumulation_steps: int = _opt(
        "N: every update of student and fake score sums the gradients of N micro-batches of --batch-size prompts — the "
        "update of one batch of N·B prompts (equal but for rounding, with its draws) in the memory of B; a KL with "
        "kl_reduction=sum sums over all N·K·B items, as at batch N·B; the CLIP hinge is taken per micro-batch (diffusers' "
        "scripts; paper: 1)", 1, check=_AT_LEAST_1,
    )
    adam_beta1: float = _opt("Adam β1 (paper: 0.9)", 0.9, check=_DECAY)
    adam_beta2: float = _opt("Adam β2 (paper: 0.999)", 0.999, check=_DECAY)
    adam_weight_decay: float = _opt("Adam weight decay (paper: 0)", 0.0, check=_NON_NEGATIVE)
    adam_epsilon: float = _opt("Adam ε (torch default)", 1e-8, check=_POSITIVE)
    max_grad_norm: float = _opt("gradient-norm clip of both networks (paper: 1.0)", 1.0, check=_POSITIVE)
    ema_decay: float = _opt("student EMA decay, warm-up min(decay, (1+s)/(10+s)) (paper: 0.9999)", 0.9999, check=_DECAY)
    save_ema: bool = _opt("the final pipeline gets the EMA student weights (else the raw ones)", True)
    dtype: Literal["fp32", "fp16", "bf16"] = _opt(
        "compute precision: fp16/bf16 autocast with fp32 master weights (paper: mixed precision on GPU)", "fp32"
    )
    gradient_checkpointing: bool = _opt("recompute activations to save memory (paper: on)", False)
    allow_tf32: bool = _opt(
        "TF32 in CUDA matmuls and cuDNN convolutions (Ampere and newer GPUs), as diffusers' training scripts' --allow_tf32 "
        "(off: torch's settings; no effect on a CPU)", False
    )
    shard: bool = _opt(
        "FSDP2: split the student's weights, gradients, Adam moments and EMA across the launch's processes, per UNet "
        "block (else every process holds them all: data parallel); fp32 or bf16", False
    )
    cache_prompt_embeds: bool = _opt(
        "keep each prompt's embeddings after its first encoding, in host memory (bounded by --prompt-cache-mb)", False
    )
    prompt_cache_mb: float = _opt("host memory for cached prompt embeddings, MiB; least recently used evicted beyond it",
                                  4096.0, check=_POSITIVE)
    batch_teacher_fake: bool = _opt(
        "run the guided teacher and fake-score passes as one UNet call (per-row LoRA) instead of two", True
    )
    # -- monitoring
    validate_every: int = _opt("sample validation images every N steps (0: off)", 0, check=_NON_NEGATIVE)
    eval_every: int = _opt(
        "score the EMA student every N steps and at step 0 with the evaluation given to distill() (0: off); "
        "the scores go to eval.jsonl and the trackers",
        0,
        check=_NON_NEGATIVE,
    )
    validation_prompts: list[str] | None = _opt(
        "prompt for validation images; repeat the flag for several (default: the first training prompts)",
        None,
        repeatable=True,
    )
    log_with: Literal["tensorboard", "wandb", "none"] = _opt("experiment tracker", "tensorboard")

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(f.name, hints[f.name], getattr(self, f.name))
            setattr(self, f.name, value)
            if "check" in f.metadata and value is not None:
                ok, requirement = f.metadata["check"]
                for item in value if isinstance(value, list) else [value]:
                    if not ok(item):
                        raise LoopfreeError(f"config key `{f.name}` must be {requirement}, got {short(item)}")
        if self.kl_weight is None:
            self.kl_weight = 0.0 if self.student == "one-step" else 0.1
        if self.guidance_fake is None:
            self.guidance_fake = self.guidance
        self._check_combinations()

    @property
    def mixed_precision(self) -> str:
        """accelerate's name for ``dtype``."""
        return {"fp32": "no"}.get(self.dtype, self.dtype)

    def _check_combinations(self) -> None:
        """Checks that involve several keys."""
        if self.student == "tiue" and self.steps == 1:
            raise LoopfreeError(
                "steps = 1 makes the tiue student a plain one-step student, which does not train well "
                "without the one-step re-parameterisation: use --student one-step (student: one-step) instead"
            )
        if self.timesteps is not None:
            t = self.timesteps
            if self.student == "tiue" and len(t) != self.steps:
                raise LoopfreeError(f"timesteps has {len(t)} entries but steps is {self.steps}")
            if any(a <= b for a, b in zip(t, t[1:])):
                raise LoopfreeError(f"timesteps must be strictly decreasing, got {short(t)}")
        if self.t_min > self.t_max:
            raise LoopfreeError(f"t_min ({self.t_min}) is larger than t_max ({self.t_max})")
        if self.clip_margin > 0 and (self.clip is None or self.tiny_vae is None):
            raise LoopfreeError("clip_margin > 0 needs a CLIP folder (--clip DIR) and a tiny VAE (--tiny-vae DIR)")
        if self.shard and self.dtype == "fp16":
            raise LoopfreeError("shard trains in fp32 or bf16 (fp16 would need a sharded gradient scaler): use --dtype bf16")
        if not self.lora_targets or self.student_lora_targets == []:
            raise LoopfreeError(f"{'lora_targets' if not self.lora_targets else 'student_lora_targets'} is empty")
        if self.student_lora_rank and self.shard:
            raise LoopfreeError("a LoRA student (student_lora_rank) trains only its adapter, data parallel: drop --shard")


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _without_none(hint: Any) -> Any:
    """`X` for `X | None`, else `hint` unchanged."""
    if get_origin(hint) in (Union, types.UnionType):
        (hint,) = [arg for arg in get_args(hint) if arg is not type(None)]
    return hint


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """`value` checked against a field's type hint; ints and numeric strings (YAML reads 1e-6 as a
    string) are accepted for floats. Raises LoopfreeError naming the key."""
    if value is None and _without_none(hint) is not hint:
        return None
    hint = _without_none(hint)
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        if value in args and isinstance(value, str):
            return value
        raise LoopfreeError(f"config key `{name}` must be one of {', '.join(args)}, got {short(value)}")
    if origin is list:
        if not isinstance(value, list):
            raise LoopfreeError(f"config key `{name}` must be a list, got {short(value)}")
        return [_coerce(f"{name}[{i}]", args[0], item) for i, item in enumerate(value)]
    if hint is float and not isinstance(value, bool):
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    if isinstance(value, hint) and (hint is bool or not isinstance(value, bool)):
        return value
    raise LoopfreeError(f"config key `{name}` must be {_TYPE_NAMES[hint]}, got {short(value)}")


def _known_keys(mapping: Mapping[Any, Any], source: str) -> dict[str, Any]:
    """`mapping` with hyphens in keys turned into underscores; unknown keys are errors."""
    names = [f.name for f in dataclasses.fields(DistillConfig)]
    result: dict[str, Any] = {}
    for key, value in mapping.items():
        name = str(key).replace("-", "_")
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise LoopfreeError(f"unknown config key `{key}` in {source}{hint}")
        if name in result:
            raise LoopfreeError(f"config key `{name}` given twice in {source}")
        result[name] = value
    return result


def _read_yaml(path: Path) -> dict[Any, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LoopfreeError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LoopfreeError(f"cannot read config {path}: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise LoopfreeError(f"cannot parse config {path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LoopfreeError(f"config {path} must be a mapping of key: value, got a {type(data).__name__}")
    return data


def load_config(yaml_path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> DistillConfig:
    """Defaults, then the YAML file's keys, then the overrides that are not None (given flags)."""
    values = _known_keys(_read_yaml(Path(yaml_path)), str(yaml_path)) if yaml_path is not None else {}
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    values.update(_known_keys(given, "the command-line options"))
    for f in dataclasses.fields(DistillConfig):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in values:
            flag = "--" + f.name.replace("_", "-")
            raise LoopfreeError(f"missing required option {flag} (or `{f.name}:` in the config file)")
    return DistillConfig(**values)


def save_config(cfg: DistillConfig, path: str | Path) -> None:
    """Write `cfg` atomically as YAML that `load_config` reads back to an equal config."""
    from loopfree.utils.outputs import write_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, allow_unicode=True))
