"""Model cards: the ``README.md`` of a published student folder, in the Hugging Face Hub's model-card form.

Everything on the card is read from the folder itself — ``loopfree.json`` (decoder timesteps), ``distill_config.yaml``
(the training settings) and ``card_results.json`` (rows that ``loopfree eval --card DIR`` adds) — so it can be
rewritten at any time (the trainer does at every publish, a resumed run included)::

    write_card(Path("runs/tiue"))
    add_card_results(Path("runs/tiue"), "coco14", results)     # a results.json of loopfree eval; rewrites the card
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from loopfree.pipelines.pipeline import BASE_RECORD
from loopfree.utils.outputs import write_atomic, write_json

CARD_RESULTS = "card_results.json"
#: training settings shown on the card, in this order
SHOWN = ("student", "steps", "objective", "guidance", "guidance_fake", "kl_weight", "kl_reduction", "regression_weight",
         "lr_student", "lr_fake", "lr_schedule", "fake_updates", "lora_rank", "lora_alpha", "batch_size", "max_steps",
         "resolution", "dtype", "seed")
#: results columns: (key in results.json metrics, header, decimals)
METRICS = (("fid", "FID", 2), ("fd", "FD", 2), ("clip_score", "CLIP", 3), ("alignment", "alignment", 3),
           ("precision", "precision", 3), ("recall", "recall", 3), ("latency_ms", "ms / image", 1))


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _use(folder: Path, recorded: dict, base: str) -> list[str]:
    if recorded.get(BASE_RECORD):  # a LoRA student
        return [f'pipe = load_pipeline("{base}", lora="{folder.name}")   # its base with the adapter, its decoder timesteps']
    return [f'pipe = load_pipeline("{folder.name}")              # samples its recorded decoder timesteps']


def _plain(folder: Path, recorded: dict, base: str) -> list[str]:
    if recorded.get(BASE_RECORD):
        return ["A LoRA in diffusers' format on the denoiser of its base (sha256 of the base's denoiser weights: "
                f"`{recorded[BASE_RECORD]}`); plain diffusers loads it onto the base "
                f'(`pipe.load_lora_weights("{folder.name}")`), as an ordinary multi-step model.']
    return ["Plain diffusers loads it too, as an ordinary multi-step model "
            f'(`StableDiffusionPipeline.from_pretrained("{folder.name}")`).']


def render_card(folder: Path) -> str:
    """The card's text for the student in ``folder``."""
    recorded = _read(folder / "loopfree.json")
    config = yaml.safe_load((folder / "distill_config.yaml").read_text()) if (folder / "distill_config.yaml").is_file() else {}
    results = _read(folder / CARD_RESULTS)
    base = config.get("teacher", "unknown")
    timesteps = recorded.get("decoder_timesteps")
    front = {"library_name": "diffusers", "pipeline_tag": "text-to-image", "base_model": str(base),
             "tags": ["loopfree", "text-to-image", "stable-diffusion", "distillation", "loop-free"]}
    kind = "one-step" if config.get("student") == "one-step" else f"loop-free (TiUE), K = {len(timesteps or []) or '?'}"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {folder.name}", "",
             f"A {kind} student distilled with loopfree from `{base}`: its UNet encoder runs once "
             "and its decoder for every decoder timestep in parallel, so an image costs about one UNet pass.", "",
             "## Use", "", "```python", "from loopfree import load_pipeline", "", *_use(folder, recorded, base),
             'image = pipe(["a photo of a cat"]).images[0]', "```", "", *_plain(folder, recorded, base), "",
             f"Decoder timesteps: `{timesteps}`" + (f"; fine-tuned from `{recorded['distilled_from']}`" if recorded.get("distilled_from") else ""),
             ""]
    if config:
        lines += ["## Training", "", "| setting | value |", "| --- | --- |"]
        lines += [f"| `{key}` | `{config[key]}` |" for key in SHOWN if key in config]
        lines.append("")
    if results:
        columns = [c for c in METRICS if any(c[0] in r["metrics"] for r in results.values())]
        lines += ["## Results", "", "| evaluation | prompts | images | " + " | ".join(c[1] for c in columns) + " |",
                  "| --- | --- | ---: | " + " | ".join("---:" for _ in columns) + " |"]
        for name, r in results.items():
            cells = [f"{r['metrics'][k]:.{d}f}" if r["metrics"].get(k) is not None else "–" for k, _, d in columns]
            lines.append(f"| {name} | {Path(str(r['settings']['prompts'])).name} | {r['images']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_card(folder: Path) -> None:
    """(Re)write ``folder/README.md`` atomically."""
    write_atomic(folder / "README.md", render_card(folder))


def add_card_results(folder: Path, name: str, results: dict) -> None:
    """Record an evaluation's ``results`` under ``name`` (replacing an older one of that name), rewrite the card."""
    rows = _read(folder / CARD_RESULTS)
    rows[name] = {"metrics": results["metrics"], "settings": {"prompts": results["settings"]["prompts"]}, "images": results["images"]}
    write_json(folder / CARD_RESULTS, rows)
    write_card(folder)
