"""What ``loopfree eval`` is asked to do, checked before anything is loaded or written (importable without torch).

    cfg = EvalConfig(out="evals/tiue", model="runs/tiue", prompts="captions_val2014.json", num_prompts=30_000,
                     reference_images="coco/val2014", inception="inception-2015-12-05.pt", clip="clip-vit-g-14")
"""

from __future__ import annotations

from dataclasses import dataclass

from loopfree.utils.errors import LoopfreeError

FEATURES = ("inception", "toy")
METRICS = ("fid", "kid", "clip", "pr", "dc", "latency", "alignment")
DEFAULT_METRICS = {"inception": ("fid", "kid", "clip", "pr", "dc", "latency"), "toy": ("alignment", "fid", "pr", "dc", "latency")}
DISTRIBUTION_METRICS = ("fid", "kid", "pr", "dc")  # the ones that need a reference set
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
METRIC_RESOLUTION = 256  # GigaGAN / clean-fid protocol: both sides centre-cropped and resized to 256 (PIL Lanczos)
PRDC_K = 5  # Naeem et al. 2020
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torchmetrics' and clean-fid's defaults


@dataclass
class EvalConfig:
    """Options of :func:`loopfree.evaluation.run.run_eval` (the flags of ``loopfree eval``)."""

    out: str
    model: str | None = None  # default: the bundled toy student
    lora: str | None = None  # a LoRA student's folder on ``model``, its base
    fuse: bool = False  # the LoRAs folded into the weights
    style_lora: str | None = None  # any diffusers-format LoRA on ``model`` (a file or a folder)
    style_scale: float = 1.0  # its weight
    prompts: str | None = None  # default (toy features only): the toy world's held-out prompts
    prompt_field: str | None = None
    num_prompts: int | None = None  # a seeded subset of the source; None: all
    images_per_prompt: int = 1
    seed: int = 0
    batch_size: int = 8
    resolution: tuple[int, int] | None = None  # (height, width) generated; default: the model's
    steps: int | None = None
    timesteps: list[int] | None = None
    mode: str = "loop_free"
    key_steps: list[int] | None = None  # propagate: the full-UNet steps; default Faster Diffusion's
    guidance: float = 1.0
    dtype: str = "fp32"
    device: str | None = None
    reference_images: str | None = None
    reference_model: str | None = None
    reference_steps: int = 50
    reference_guidance: float = 4.5
    inception: str | None = None
    clip: str | None = None
    tiny_vae: str | None = None  # an AutoencoderTiny folder decodes the evaluated model's images (not the reference model's)
    features: str = "inception"
    metrics: tuple[str, ...] | None = None  # default: DEFAULT_METRICS[features]
    metric_resolution: int = METRIC_RESOLUTION  # inception features; the toy classifier reads 64×64
    latency_repeats: int = 5
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.features not in FEATURES:
            raise LoopfreeError(f"--features must be one of {', '.join(FEATURES)}, got {self.features!r}")
        self.metrics = tuple(dict.fromkeys(self.metrics or DEFAULT_METRICS[self.features]))
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise LoopfreeError(f"--metrics must name some of {','.join(METRICS)}, got {','.join(unknown) or 'none'}")
        if "alignment" in self.metrics and self.features != "toy":
            raise LoopfreeError("--metrics alignment reads the toy world's attributes: it needs --features toy")
        for name in ("images_per_prompt", "batch_size", "reference_steps", "latency_repeats"):
            if getattr(self, name) < 1:
                raise LoopfreeError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise LoopfreeError(f"--num-prompts must be at least 1, got {self.num_prompts}")
        if self.reference_images and self.reference_model:
            raise LoopfreeError("give --reference-images or --reference-model, not both")
        if self.features == "inception" and self.metric_resolution < 16:
            raise LoopfreeError(f"--metric-resolution must be at least 16, got {self.metric_resolution}")
        needs_reference = [m for m in self.metrics if m in DISTRIBUTION_METRICS]
        if needs_reference and self.features == "inception" and not (self.reference_images or self.reference_model):
            raise LoopfreeError(f"--metrics {','.join(needs_reference)} compare against a reference: give --reference-images DIR "
                                "or --reference-model DIR")
        if self.prompts is None and self.features != "toy":
            raise LoopfreeError("--prompts is required (a prompt file, a COCO captions JSON, DrawBench CSV or PartiPrompts TSV); "
                                "only --features toy has a default")

    @property
    def needs_reference(self) -> bool:
        return any(m in DISTRIBUTION_METRICS for m in self.metrics)
