"""The toy world's metric network: a small CNN that reads attributes, geometry and features.

One classification head per discrete attribute, one regression head for the continuous ground
truth (cx, cy, size in pixels, used for the diversity figure), and a penultimate feature vector
for Fréchet distance and PRDC. Trained on an endless stream of fresh samples with mild noise,
blur and colour jitter, so it also reads slightly imperfect generated images. The shipped
weights live in ``loopfree/assets/classifier`` (``model.safetensors`` + ``config.json``);
retrain them with ``python -m loopfree.toy.classifier``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from loopfree.utils.errors import LoopfreeError
from loopfree.toy.assets import asset_path
from loopfree.toy.world import ATTRIBUTES, IMAGE_SIZE, TRUTH_FIELDS, Attributes, ToyWorld, attribute_labels

logger = logging.getLogger(__name__)

#: Ground truth is regressed as (value - _TRUTH_CENTRE) / _TRUTH_SCALE.
_TRUTH_CENTRE = IMAGE_SIZE / 2
_TRUTH_SCALE = IMAGE_SIZE / 4
#: Weight of the regression loss against the summed cross-entropies.
_REGRESSION_WEIGHT = 4.0


def default_path() -> Path:
    """The folder of the shipped classifier."""
    return asset_path("classifier")


@dataclass
class Prediction:
    """Classifier read-out for N images: class labels per attribute and (N, 3) cx, cy, size in pixels."""

    labels: dict[str, np.ndarray]
    truth: np.ndarray


class ToyClassifier(nn.Module):
    """Stride-2 conv stack (64 -> 4 pixels), two linear layers to the features, then the heads."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 64), hidden: int = 128, feature_dim: int = 64):
        super().__init__()
        self.config = {"widths": list(widths), "hidden": hidden, "feature_dim": feature_dim}
        layers: list[nn.Module] = []
        channels = 3
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.ReLU()]
            channels = width
        side = IMAGE_SIZE // 2 ** len(widths)
        self.trunk = nn.Sequential(
            *layers,
            nn.Flatten(),
            nn.Linear(channels * side * side, hidden),
            nn.ReLU(),
            nn.Linear(hidden, feature_dim),
            nn.ReLU(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, len(c)) for name, c in ATTRIBUTES.items()})
        self.regressor = nn.Linear(feature_dim, len(TRUTH_FIELDS))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, feature_dim) of images in [-1, 1], (N, 3, 64, 64)."""
        if images.shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE):
            expected = f"(N, 3, {IMAGE_SIZE}, {IMAGE_SIZE})"
            raise LoopfreeError(f"classifier expects {expected} images, got {tuple(images.shape)}")
        return self.trunk(images)

    def forward(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Logits per attribute and the normalised (cx, cy, size) regression."""
        feats = self.features(images)
        return {name: head(feats) for name, head in self.heads.items()}, self.regressor(feats)

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
        """Features of many images, batched, as float64 numpy (N, feature_dim)."""
        chunks = [self.features(chunk.float()) for chunk in images.split(batch_size)]
        return torch.cat(chunks).double().numpy()

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> Prediction:
        """Predicted attribute labels and (cx, cy, size) in pixels, batched."""
        labels: dict[str, list[torch.Tensor]] = {name: [] for name in ATTRIBUTES}
        truth = []
        for chunk in images.split(batch_size):
            logits, reg = self(chunk.float())
            for name, value in logits.items():
                labels[name].append(value.argmax(dim=1))
            truth.append(reg * _TRUTH_SCALE + _TRUTH_CENTRE)
        return Prediction(
            {name: torch.cat(parts).numpy() for name, parts in labels.items()}, torch.cat(truth).double().numpy()
        )


def matches(prediction: Prediction, attrs: list[Attributes]) -> dict[str, np.ndarray]:
    """Per attribute, (N,) booleans: whether the predicted label equals ``attrs``' label."""
    truth = attribute_labels(attrs)
    return {name: prediction.labels[name] == truth[name] for name in ATTRIBUTES}


def accuracy(prediction: Prediction, attrs: list[Attributes]) -> dict[str, float]:
    """Per-attribute fraction of predicted labels equal to ``attrs``' labels."""
    return {name: float(hits.mean()) for name, hits in matches(prediction, attrs).items()}


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mild per-image corruption: blur (half the images), colour offset/contrast, gaussian noise."""
    n = images.shape[0]

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return torch.rand(n, *shape, generator=generator) * (high - low) + low

    sigma = uniform(0.3, 1.2) * (torch.rand(n, generator=generator) < 0.5)
    taps = torch.arange(-2, 3, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps[None] / sigma.clamp(min=1e-3)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True))[:, :, None, None, None]  # (N, 5, 1, 1, 1)
    x = F.pad(images, (2, 2, 2, 2), mode="replicate")
    x = sum(kernel[:, i] * x[:, :, :, i : i + IMAGE_SIZE] for i in range(len(taps)))
    x = sum(kernel[:, i] * x[:, :, i : i + IMAGE_SIZE, :] for i in range(len(taps)))
    x = x * uniform(0.9, 1.1, 1, 1, 1) + uniform(-0.06, 0.06, 3, 1, 1)
    x = x + torch.randn(x.shape, generator=generator) * uniform(0.0, 0.1, 1, 1, 1)
    return x.clamp(-1.0, 1.0)


def train_classifier(
    steps: int = 2000,
    seed: int = 0,
    out_dir: str | Path | None = None,
    batch_size: int = 128,
    lr: float = 2e-3,
    threads: int = 1,
) -> ToyClassifier:
    """Train on fresh world samples (cosine-decayed AdamW); save to ``out_dir`` if given."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        world = ToyWorld(seed)
        model = ToyClassifier()
        optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
        start = time.time()
        for step in range(steps):
            batch = world.sample(batch_size)
            labels = {k: torch.from_numpy(v) for k, v in batch.labels().items()}
            target = (torch.from_numpy(batch.truth) - _TRUTH_CENTRE) / _TRUTH_SCALE
            logits, reg = model(augment(batch.tensor(), generator))
            loss = sum(F.cross_entropy(logits[k], labels[k]) for k in ATTRIBUTES)
            loss = loss + _REGRESSION_WEIGHT * F.mse_loss(reg, target)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            if step % 500 == 0 or step == steps - 1:
                logger.info("step %5d  loss %.4f  %.0fs", step, loss.item(), time.time() - start)
        model.eval()
        if out_dir is not None:
            save_classifier(model, out_dir, training={"steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr})
        return model
    finally:
        torch.set_num_threads(previous_threads)


def save_classifier(model: ToyClassifier, out_dir: str | Path, training: dict) -> None:
    """Write ``model.safetensors`` and ``config.json`` (architecture, attribute classes, training)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    config = {
        **model.config,
        "attributes": ATTRIBUTES,
        "truth_fields": TRUTH_FIELDS,
        "image_size": IMAGE_SIZE,
        "training": training,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_classifier(path: str | Path | None = None) -> ToyClassifier:
    """Load a classifier folder (default: the shipped one), in eval mode."""
    folder = Path(path) if path is not None else default_path()
    weights, config_file = folder / "model.safetensors", folder / "config.json"
    if not weights.is_file() or not config_file.is_file():
        raise LoopfreeError(f"no classifier at {folder} (needs model.safetensors and config.json)")
    config = json.loads(config_file.read_text())
    world = {name: list(classes) for name, classes in ATTRIBUTES.items()}
    if config["attributes"] != world or config["image_size"] != IMAGE_SIZE:
        raise LoopfreeError(f"classifier at {folder} was trained for a different toy world; retrain it")
    model = ToyClassifier(tuple(config["widths"]), config["hidden"], config["feature_dim"])
    model.load_state_dict(load_file(weights))
    return model.eval()


def main() -> None:
    """Retrain the shipped classifier and report its accuracy on fresh samples."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=default_path())
    parser.add_argument("--eval-seed", type=int, default=12345)
    parser.add_argument("--eval-n", type=int, default=2000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.time()
    model = train_classifier(args.steps, args.seed, args.out)
    print(f"trained in {time.time() - start:.0f}s -> {args.out}")
    sample = ToyWorld(args.eval_seed).sample(args.eval_n)
    prediction = model.predict(sample.tensor())
    rmse = np.sqrt(((prediction.truth - sample.truth) ** 2).mean(axis=0))
    print("accuracy", accuracy(prediction, sample.attrs))
    print("truth RMSE (px)", dict(zip(TRUTH_FIELDS, rmse.round(3).tolist())))


if __name__ == "__main__":
    main()
