"""A seeded procedural text-to-image world: one shape on a plain background, 64x64 RGB.

Each image holds a single anti-aliased shape. Five discrete attributes (shape, colour, size,
position, background) are named by every caption, so the prompt fully determines them; inside
each class the exact centre and size are jittered, which gives every prompt a distribution of
images. The attribute words of different attributes never overlap, so each word names one
attribute value on its own. Everything is deterministic for a seed (``numpy.random.Generator``).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from loopfree.utils.errors import LoopfreeError

IMAGE_SIZE = 64

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
SIZES = ("small", "large")
POSITIONS = ("left", "centre", "right")
BACKGROUNDS = ("white", "black", "gray")

#: attribute name -> its classes, in the order used for integer labels.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOURS,
    "size": SIZES,
    "position": POSITIONS,
    "background": BACKGROUNDS,
}

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 200, 30),
}
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}

#: Range (pixels) of the shape's width for each size class: circle diameter, square side,
#: triangle side. The gap between classes keeps them unambiguous.
SIZE_RANGE: dict[str, tuple[float, float]] = {"small": (14.0, 20.0), "large": (28.0, 34.0)}
#: Range (pixels) of the bounding-box centre x for each position class.
POSITION_RANGE: dict[str, tuple[float, float]] = {
    "left": (17.0, 23.0),
    "centre": (29.0, 35.0),
    "right": (41.0, 47.0),
}
#: Range (pixels) of the bounding-box centre y, shared by all classes.
CY_RANGE = (24.0, 40.0)

#: The worlds images are drawn from: the base world, and a shifted one its teacher never saw (issue 31's transfer
#: test) — "night": every background is black, whatever the caption names; shapes and captions unchanged. (A subtler
#: shift, a background warming toward orange, did not survive the toy autoencoder, which draws every background as one
#: of the three it was trained on; this one is a fine-tune's change of what a caption means.)
DOMAINS = ("base", "night")


def check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise LoopfreeError(f"domain must be one of {', '.join(DOMAINS)}, got {domain!r}")


def shown(attrs: Attributes, domain: str = "base") -> Attributes:
    """What an image of ``domain`` shows for a caption naming ``attrs``."""
    check_domain(domain)
    return replace(attrs, background="black") if domain == "night" else attrs


#: Continuous ground truth carried by every sample, in this column order.
TRUTH_FIELDS = ("cx", "cy", "size")

CAPTION_TEMPLATES = (
    "a {size} {colour} {shape} in the {position} of a {background} image",
    "a {size} {colour} {shape} on a {background} background, {position}",
    "{size} {colour} {shape}, {position}, {background} background",
    "a {background} background with a {size} {colour} {shape} at the {position}",
    "a {colour} {shape}, {size}, in the {position}, on {background}",
    "{position}: a {size} {colour} {shape} on {background}",
)

_WORD = re.compile(r"[a-z]+")


def _caption_words() -> tuple[str, ...]:
    words = {w for values in ATTRIBUTES.values() for w in values}
    for template in CAPTION_TEMPLATES:
        words.update(_WORD.findall(re.sub(r"\{\w+\}", " ", template)))
    return tuple(sorted(words))


#: Every word any caption can contain (punctuation aside).
VOCABULARY = _caption_words()


@dataclass(frozen=True)
class Attributes:
    """The discrete content of one image; values are checked against :data:`ATTRIBUTES`."""

    shape: str
    colour: str
    size: str
    position: str
    background: str

    def __post_init__(self) -> None:
        for name, classes in ATTRIBUTES.items():
            if getattr(self, name) not in classes:
                raise LoopfreeError(f"{name} must be one of {', '.join(classes)}, got {getattr(self, name)!r}")

    def as_dict(self) -> dict[str, str]:
        """Attribute name -> value."""
        return asdict(self)


@dataclass(frozen=True)
class Truth:
    """Continuous ground truth of one rendered shape, in pixels (bounding-box centre and width)."""

    cx: float
    cy: float
    size: float


@dataclass
class ToySample:
    """A batch of captioned images: uint8 ``images`` (N, 64, 64, 3) and ``truth`` (N, 3) = cx, cy, size."""

    images: np.ndarray
    captions: list[str]
    attrs: list[Attributes]
    truth: np.ndarray

    def __len__(self) -> int:
        return len(self.captions)

    def tensor(self) -> torch.Tensor:
        """The images as float32 (N, 3, 64, 64) in [-1, 1]."""
        return to_tensor(self.images)

    def labels(self) -> dict[str, np.ndarray]:
        """Attribute name -> (N,) int64 class labels."""
        return attribute_labels(self.attrs)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3), clipped and rounded."""
    scaled = ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255)
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def attribute_labels(attrs: list[Attributes]) -> dict[str, np.ndarray]:
    """Attribute name -> (N,) int64 class labels of ``attrs``."""
    return {
        name: np.array([classes.index(getattr(a, name)) for a in attrs], dtype=np.int64)
        for name, classes in ATTRIBUTES.items()
    }


def sample_attributes(rng: np.random.Generator) -> Attributes:
    """Uniformly random discrete attributes."""
    return Attributes(**{name: classes[rng.integers(len(classes))] for name, classes in ATTRIBUTES.items()})


def sample_truth(attrs: Attributes, rng: np.random.Generator) -> Truth:
    """Uniform jitter of centre and size inside the ranges of ``attrs``' classes."""
    cx = rng.uniform(*POSITION_RANGE[attrs.position])
    cy = rng.uniform(*CY_RANGE)
    size = rng.uniform(*SIZE_RANGE[attrs.size])
    return Truth(float(cx), float(cy), float(size))


def rasterise(attrs: list[Attributes], truth: np.ndarray, domain: str = "base") -> np.ndarray:
    """Draw shapes at exact ``truth`` (N, 3) = cx, cy, size as uint8 (N, 64, 64, 3) in ``domain``'s style.

    Edges are anti-aliased from the signed distance (pixels) of each pixel centre to the shape:
    coverage = clip(0.5 - distance, 0, 1).
    """
    n = len(attrs)
    centres = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5
    t = np.asarray(truth, dtype=np.float32).reshape(n, len(TRUTH_FIELDS))
    shape_of = np.array([SHAPES.index(a.shape) for a in attrs])
    distance = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for shape_index, shape in enumerate(SHAPES):
        rows = np.flatnonzero(shape_of == shape_index)
        dx = np.abs(centres[None, None, :] - t[rows, 0, None, None])
        dy = centres[None, :, None] - t[rows, 1, None, None]
        half = t[rows, 2, None, None] / 2
        if shape == "circle":
            distance[rows] = np.sqrt(dx * dx + dy * dy) - half
        elif shape == "square":
            distance[rows] = np.maximum(dx, np.abs(dy)) - half
        else:
            # Upward equilateral triangle, bounding box centred on (cx, cy): the base line and
            # the two slanted sides (unit normals (0, 1) and (+-sqrt(3)/2, -1/2)).
            half_height = half * np.float32(np.sqrt(3.0) / 2)
            slant = (dx * np.float32(np.sqrt(3.0)) - dy - half_height) / 2
            distance[rows] = np.maximum(dy - half_height, slant)
    alpha = np.clip(0.5 - distance, 0.0, 1.0)[..., None]
    fg = np.array([COLOUR_RGB[a.colour] for a in attrs], dtype=np.float32)[:, None, None, :]
    bg = np.array([BACKGROUND_RGB[shown(a, domain).background] for a in attrs], dtype=np.float32)[:, None, None, :]
    return np.rint(bg + (fg - bg) * alpha).astype(np.uint8)


def render(attrs: Attributes, rng: np.random.Generator) -> tuple[np.ndarray, Truth]:
    """One image (64, 64, 3) uint8 with jitter drawn from ``rng``, and its ground truth."""
    truth = sample_truth(attrs, rng)
    image = rasterise([attrs], np.array([[truth.cx, truth.cy, truth.size]]))[0]
    return image, truth


def make_caption(attrs: Attributes, rng: np.random.Generator) -> str:
    """A caption naming every attribute, from a randomly chosen template."""
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    return template.format(**attrs.as_dict())


def parse_prompt(prompt: str) -> Attributes:
    """Recover the discrete attributes named by ``prompt``; each must be named exactly once."""
    words = set(_WORD.findall(prompt.lower()))
    found = {}
    for name, classes in ATTRIBUTES.items():
        named = [c for c in classes if c in words]
        if len(named) != 1:
            problem = "does not name" if not named else f"names several ({', '.join(named)}) of"
            raise LoopfreeError(f"prompt {prompt!r} {problem} the {name} ({'/'.join(classes)})")
        found[name] = named[0]
    return Attributes(**found)


def _draw(attrs: list[Attributes], captions: list[str], rng: np.random.Generator, domain: str = "base") -> ToySample:
    truth = np.array(
        [[t.cx, t.cy, t.size] for t in (sample_truth(a, rng) for a in attrs)], dtype=np.float32
    ).reshape(len(attrs), len(TRUTH_FIELDS))
    return ToySample(rasterise(attrs, truth, domain), captions, attrs, truth)


class ToyWorld:
    """An endless seeded stream of captioned images (of ``domain``: the same stream, drawn in its style)."""

    def __init__(self, seed: int, domain: str = "base") -> None:
        check_domain(domain)
        self.rng, self.domain = np.random.default_rng(seed), domain

    def sample(self, n: int) -> ToySample:
        """The next ``n`` random samples of the stream."""
        attrs = [sample_attributes(self.rng) for _ in range(n)]
        captions = [make_caption(a, self.rng) for a in attrs]
        return _draw(attrs, captions, self.rng, self.domain)


def all_attributes() -> list[Attributes]:
    """Every combination of discrete attributes, in a fixed order."""
    return [Attributes(*combo) for combo in itertools.product(*ATTRIBUTES.values())]


def heldout_prompts(n: int, seed: int = 0) -> list[str]:
    """A fixed evaluation set of ``n`` prompts with pairwise distinct attribute combinations."""
    combos = all_attributes()
    if not 0 < n <= len(combos):
        raise LoopfreeError(f"heldout_prompts: n must be in 1..{len(combos)}, got {n}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(combos))[:n]
    return [make_caption(combos[i], rng) for i in order]


def training_prompts(n: int, exclude: list[str], seed: int = 0) -> list[str]:
    """``n`` captions of random attribute combinations other than those ``exclude``'s prompts name
    (prompts for distillation, kept apart from an evaluation set)."""
    excluded = {parse_prompt(p) for p in exclude}
    combos = [a for a in all_attributes() if a not in excluded]
    if not combos:
        raise LoopfreeError("training_prompts: every attribute combination is excluded")
    rng = np.random.default_rng(seed)
    return [make_caption(combos[i], rng) for i in rng.integers(len(combos), size=n)]


def render_for_prompt(prompt: str, n: int, seed: int = 0, domain: str = "base") -> ToySample:
    """``n`` real images of the attributes ``prompt`` names (jitter drawn from ``seed``), drawn in ``domain``."""
    attrs = parse_prompt(prompt)
    return _draw([attrs] * n, [prompt] * n, np.random.default_rng(seed), domain)
