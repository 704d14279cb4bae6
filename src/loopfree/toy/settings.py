"""Settings of the toy-world commands, importable without torch (the CLI reads their defaults).

``TeacherConfig``: ``loopfree toy train-teacher``; ``MMDiTTeacherConfig``: its ``--arch mmdit``. ``DemoConfig``, ``STUDENTS``, ``TOY_DISTILL`` and ``DEMO_BUDGET``: ``loopfree demo``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loopfree.utils.errors import LoopfreeError


@dataclass
class TeacherConfig:
    """Architecture, optimisation and evaluation settings of :func:`train_teacher`."""

    seed: int = 0
    threads: int = 2
    # (a) autoencoder: one 2x downsampling per channel entry after the first
    vae_channels: tuple[int, ...] = (16, 32, 32)
    vae_groups: int = 8
    latent_channels: int = 4
    vae_steps: int = 2000
    vae_batch: int = 32
    vae_lr: float = 5e-4
    vae_kl_weight: float = 1e-4  # on the per-element KL, against the per-element MSE
    # (b) text encoder + UNet
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    unet_channels: tuple[int, ...] = (48, 96, 96, 96)  # 16, 8, 4, 2 latent pixels
    # cross-attention per resolution, finest first: the coarse levels know where they are (from the
    # zero padding), which "left"/"right" need; none at 16x16, where attention costs most
    unet_cross_attention: tuple[bool, ...] = (False, True, True, True)
    unet_layers: int = 1
    unet_groups: int = 16
    unet_heads: int = 4
    unet_steps: int = 6000  # about 30 minutes on 2 CPU cores
    unet_batch: int = 32
    unet_lr: float = 3e-4
    warmup_steps: int = 500
    prompt_dropout: float = 0.1
    prediction_type: str = "epsilon"
    snr_gamma: float = 5.0  # min-SNR-γ loss weights; 0 = plain MSE
    ema_decay: float = 0.999
    latent_cache: int = 16384  # toy images encoded once for stage (b)
    minutes: float | None = None  # wall-clock cap on stage (b); it checkpoints and the run goes on to (c), (d)
    # bookkeeping and probes
    checkpoint_minutes: float = 5.0
    log_every: int = 50
    probe_every: int = 1000  # stage (b): quick accuracy probe every this many steps (0 = never)
    probe_prompts: int = 24
    probe_steps: int = 20
    # (c), (d)
    max_megabytes: float = 30.0
    eval_prompts: int = 64
    eval_images_per_prompt: int = 2
    eval_steps: int = 50
    guidance_scales: tuple[float, ...] = (4.5, 2.0)

    def __post_init__(self) -> None:
        if len(self.unet_cross_attention) != len(self.unet_channels):
            raise LoopfreeError("unet_cross_attention needs one entry per unet_channels entry")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise LoopfreeError(f"prediction_type must be epsilon or v_prediction, got {self.prediction_type!r}")

@dataclass
class MMDiTTeacherConfig:
    """Settings of :func:`loopfree.demo.teacher_mmdit.train_teacher`: an SD3-shaped teacher on the UNet teacher's VAE."""

    seed: int = 0
    threads: int = 2
    # two CLIP text encoders with projections (SD3's CLIP-L and CLIP-G roles), the sequence from their penultimate layer
    text_width: int = 64
    text_layers: int = 3
    text_heads: int = 4
    text_projection: int = 64  # each pooled embedding; pooled_projection_dim is their sum
    # SD3Transformer2DModel: 2x2 patches of the 16x16x4 latents (64 image tokens), inner width heads x head_dim
    layers: int = 8
    heads: int = 4
    head_dim: int = 32
    context_rows: int = 256  # the zero rows StableDiffusion3Pipeline appends without T5 (its max_sequence_length)
    shift: float = 1.0  # the σ schedule's shift (SD3: 3.0 at 1024², 1.0 at 256²; 64 image tokens here)
    logit_mean: float = 0.0  # SD3's logit-normal σ sampling (paper: m = 0, s = 1)
    logit_std: float = 1.0
    steps: int = 9000  # about an hour on 2 CPU cores (0.37 s a step)
    batch: int = 32
    lr: float = 3e-4
    warmup_steps: int = 500
    prompt_dropout: float = 0.1
    ema_decay: float = 0.999
    latent_cache: int = 16384  # toy images encoded once
    minutes: float | None = None  # wall-clock cap on training; it checkpoints and the run goes on to save and evaluate
    checkpoint_minutes: float = 5.0
    log_every: int = 50
    probe_every: int = 1000  # quick accuracy probe every this many steps (0 = never)
    probe_prompts: int = 24
    probe_steps: int = 20
    max_megabytes: float = 25.0
    eval_prompts: int = 64
    eval_images_per_prompt: int = 4
    eval_steps: int = 50
    guidance_scales: tuple[float, ...] = (4.5, 2.0)

    def __post_init__(self) -> None:
        if self.context_rows < 1:
            raise LoopfreeError(f"context_rows must be at least 1, got {self.context_rows}")


#: Student kinds: row name and the DistillConfig keys that make them.
STUDENTS: dict[str, tuple[str, dict]] = {
    "one-step": ("one-step VSD", dict(student="one-step", kl_weight=0.0)),  # SwiftBrush: no KL term
    "tiue-no-kl": ("TiUE w/o KL", dict(student="tiue", kl_weight=0.0)),
    "tiue": ("TiUE", dict(student="tiue")),  # KL summed as in the paper, weight TOY_DISTILL's
}

#: DistillConfig keys that ``loopfree demo`` takes as flags (training settings; the run's plumbing is its own).
DEMO_DISTILL_KEYS = ("batch_size", "steps", "timesteps", "shared_blocks", "one_step_timestep", "objective", "sid_alpha", "guidance",
                     "guidance_fake", "t_min", "t_max", "kl_weight", "kl_reduction", "regression_weight",
                     "regression_pairs", "regression_steps", "regression_guidance", "fake_cfg_dropout", "lora_rank",
                     "lora_alpha", "lora_targets", "lr_student", "lr_fake", "lr_schedule", "lr_fake_schedule",
                     "lr_warmup_steps", "fake_updates", "max_grad_norm", "ema_decay", "dtype")
#: Distillation settings for the toy teacher (5 M parameters, from scratch); the rest are the paper's.
TOY_DISTILL = dict(
    batch_size=8,  # prompts per step (paper: 8 per GPU)
    lr_student=3e-5,  # the paper's 1e-6 is for an 865 M-parameter UNet and 66 k steps; 1e-4 collapses diversity (docs/toy-world.md study)
    lr_fake=3e-3,  # paper 1e-3: 3e-3 lets the small fake score follow the student (docs/toy-world.md study: better alignment and fd)
    kl_weight=1.0,  # summed over K·B (paper 0.1): keeps diversity ≥ 1.5 at 300 steps (docs/toy-world.md study); one-step has none
    lora_rank=16,  # the toy UNet is 48-96 channels wide (paper: 64 of 320-1280)
    lora_alpha=27.0,  # same alpha/rank as the paper's 108/64
    # the toy UNet has attention only at its coarse levels: a LoRA on to_q/to_v alone (paper) cannot
    # follow the student and the student diverged within 400 steps; on every attention and resnet
    # projection it does
    lora_targets=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
    checkpoint_every=100,
    checkpoints_total_limit=1,
    # DMD's regression term on 512 cached 25-step teacher pairs (paper: none): in the toy study's probes
    # (docs/toy-world.md) fd 24 against 58 without it, diversity 1.82 against 1.62, at 300 steps; λ_reg 1.0, four times
    # DMD's 0.25: at 1,000 steps and 3 seeds TiUE's fd 31 → 24 and alignment .94 → .99 (studies/recipe-reg1.yaml)
    regression_weight=1.0,
    regression_pairs=512,
    regression_steps=25,
    cache_prompt_embeds=True,  # a few thousand short captions
    log_with="none",
)
#: The recipe translated for the toy MMDiT teacher (studies/mmdit.yaml): its LoRA on every attention and MLP
#: projection of the joint blocks, as the UNet's is on every attention and resnet projection
MMDIT_DISTILL = dict(lora_targets=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                                   "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"])
#: The demo's short budget (DemoConfig.max_steps, 5 min on 2 cores) over the recipe: a doubled student lr, 8-step
#: teacher pairs (the teacher's 8-step DDIM scores as its 25 steps do) and DMD's λ_reg 0.25, the settings checked at
#: 3 training seeds at this budget (studies/demo-budget.yaml, docs/toy-world.md)
DEMO_BUDGET = dict(lr_student=6e-5, regression_steps=8, regression_weight=0.25)
#: Nearest neighbours of precision/recall/density/coverage (Naeem et al. 2020: 5).
PRDC_K = 5
#: Evaluation prompts are drawn from this many held-out attribute combinations, never distilled on.
EVAL_POOL = 64


#: ``loopfree demo --teacher-arch``: the bundled teacher of each architecture
TEACHER_ARCHS = {"unet": "teacher", "mmdit": "teacher-mmdit"}


@dataclass
class DemoConfig:
    """Options of :func:`run_demo`."""

    out: str = "loopfree-demo"
    max_steps: int = 175  # distillation steps per student, with DEMO_BUDGET's settings
    students: tuple[str, ...] = ("one-step", "tiue")  # kinds from STUDENTS, in table order
    train_seeds: int = 1  # each student is trained this many times (seeds 0..N-1)
    num_prompts: int = 16  # held-out evaluation prompts (distinct attribute combinations), at most EVAL_POOL
    images_per_prompt: int = 4  # images per evaluation prompt
    teacher: str | None = None  # default: the bundled toy teacher of teacher_arch
    teacher_arch: str = "unet"  # the bundled teacher: unet (DDIM) or mmdit (SD3-shaped, rectified flow)
    teacher_steps: int = 50  # steps of the reference teacher rows (DDIM loop and propagate; an MMDiT's Euler)
    guidance: float = 4.5  # the teacher rows' guidance (paper: 4.5); distillation's is in ``distill``
    distill_prompts: int = 4000  # distillation prompt file length
    seed: int = 0  # evaluation prompts and x_T
    distill: dict = field(default_factory=dict)  # DistillConfig settings over TOY_DISTILL and DEMO_BUDGET (the ablations)
    eval_every: int = 0  # learning curves: score each student every N steps (0: off)

    def __post_init__(self) -> None:
        if self.teacher_arch not in TEACHER_ARCHS:
            raise LoopfreeError(f"--teacher-arch must be one of {', '.join(TEACHER_ARCHS)}, got {self.teacher_arch!r}")
        unknown = [s for s in self.students if s not in STUDENTS]
        if unknown or not self.students:
            raise LoopfreeError(f"--students must name some of {', '.join(STUDENTS)}, got {','.join(self.students) or 'none'}")
        for name in ("max_steps", "train_seeds", "images_per_prompt", "teacher_steps", "distill_prompts"):
            if getattr(self, name) < 1:
                raise LoopfreeError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 1 <= self.num_prompts <= EVAL_POOL:
            raise LoopfreeError(f"--num-prompts must be in 1..{EVAL_POOL} (the held-out attribute combinations), got {self.num_prompts}")
        if self.images_per_prompt < 2:
            raise LoopfreeError("--images-per-prompt must be at least 2: diversity is the spread over one prompt's images")
        unknown = sorted(set(self.distill) - set(DEMO_DISTILL_KEYS))
        if unknown:
            raise LoopfreeError(f"the demo does not take the distillation setting(s) {', '.join(unknown)}")
        if self.eval_every < 0:
            raise LoopfreeError(f"--eval-every must be at least 0, got {self.eval_every}")
        if self.num_prompts * self.images_per_prompt <= PRDC_K:
            raise LoopfreeError(f"--num-prompts × --images-per-prompt must exceed {PRDC_K}: precision/recall use {PRDC_K} nearest neighbours")
