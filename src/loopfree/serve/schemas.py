"""The image request: the OpenAI Images API's fields plus loop-free extras, and its validation.

    POST /v1/images/generations  {"prompt": "a red circle", "n": 2, "size": "64x64", "seed": 3, "steps": 4}

Wrong types and unknown fields fail parsing (HTTP 422); values the model can't take fail :func:`resolve`
(HTTP 400). Every message is one line naming the field. Image i of a request with seed s starts from
x_T = ``initial_latents(pipe, [image_seed(s, 0, i)], …)``, as in ``loopfree generate``.
"""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, StrictStr, ValidationError

from loopfree.utils.errors import LoopfreeError
from loopfree.utils.vocabulary import MAX_SEED, MODES
from loopfree.utils.seeding import image_seed
from loopfree.serve.engine import Engine, Item, Settings

MAX_IMAGES = 10  # n per request, as in the OpenAI API
MAX_PROMPT = 2000  # characters
MAX_GUIDANCE = 100.0


class RequestError(LoopfreeError):
    """A request value the server can't take: HTTP 400, naming the field."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


class ImageRequest(BaseModel):
    """``POST /v1/images/generations``'s body. ``seed``, ``steps``, ``guidance`` and ``mode`` are loopfree's."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr
    model: StrictStr | None = None
    n: StrictInt = 1
    size: StrictStr | None = None  # "WIDTHxHEIGHT" or "auto" (the model's size)
    response_format: StrictStr | None = None  # "b64_json" (the default)
    # accepted so client code that sets them keeps working; they change nothing here (steps and mode decide quality)
    user: StrictStr | None = None
    quality: StrictStr | None = None
    style: StrictStr | None = None
    seed: StrictInt | None = None  # drawn and returned when absent
    steps: StrictInt | None = None  # K decoders (loop_free) or DDIM steps (loop); default: the model's
    guidance: StrictFloat | None = None  # classifier-free guidance scale, 1 = off
    mode: StrictStr | None = None  # loop_free (a student's default) or loop (a teacher's default)


@dataclass(frozen=True)
class Order:
    """A validated request: the call settings, one item per image, and the seed it used."""

    settings: Settings
    items: list[Item]
    seed: int


def validation_message(error: ValidationError | list[dict]) -> str:
    """Pydantic's first complaint as one line: ``n: Input should be a valid integer``."""
    first = (error.errors() if isinstance(error, ValidationError) else list(error))[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
    return f"{where}: {first.get('msg', 'invalid value')}"


def parse_size(size: str | None, default: int) -> tuple[int, int]:
    """``"WIDTHxHEIGHT"`` as (height, width); ``None`` or ``"auto"``: the model's square size."""
    if size is None or size == "auto":
        return default, default
    match = re.fullmatch(r"(\d{1,6})x(\d{1,6})", size.strip())
    if not match:
        raise RequestError("size", f"size must be WIDTHxHEIGHT (e.g. '{default}x{default}') or 'auto', got {size!r}")
    return int(match.group(2)), int(match.group(1))


def resolve(request: ImageRequest, engine: Engine) -> Order:
    """Check ``request`` against the served models; the settings and items it asks for."""
    name = request.model or engine.student.id
    if name not in engine.models:
        raise RequestError("model", f"model {name!r} is not served here (this server has: {', '.join(engine.models)})")
    model = engine.models[name]
    prompt = request.prompt  # as given, like ``loopfree generate``
    if not prompt.strip():
        raise RequestError("prompt", "prompt is empty")
    if len(prompt) > MAX_PROMPT:
        raise RequestError("prompt", f"prompt is {len(prompt)} characters long; at most {MAX_PROMPT}")
    if not 1 <= request.n <= MAX_IMAGES:
        raise RequestError("n", f"n must be in 1..{MAX_IMAGES}, got {request.n}")
    if request.response_format not in (None, "b64_json"):
        why = "this server keeps no files to link to" if request.response_format == "url" else "the only format"
        raise RequestError("response_format", f"response_format must be 'b64_json' ({why}), got {request.response_format!r}")
    height, width = parse_size(request.size, model.info.default_size)
    seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
    if not 0 <= seed <= MAX_SEED:
        raise RequestError("seed", f"seed must be in 0..2^64-1, got {seed}")
    guidance = 1.0 if request.guidance is None else float(request.guidance)
    if not (math.isfinite(guidance) and 0.0 <= guidance <= MAX_GUIDANCE):
        raise RequestError("guidance", f"guidance must be a finite number in 0..{MAX_GUIDANCE:g}, got {guidance}")
    if model.exported and guidance != 1.0:
        raise RequestError("guidance", f"an exported student samples unguided (guidance 1), not {guidance:g}")
    mode = request.mode or model.default_mode
    if mode not in MODES:
        raise RequestError("mode", f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    try:
        model.info.check_size(height, width)
    except LoopfreeError as e:
        raise RequestError("size", str(e)) from None
    try:
        steps = model.pipe.plan_steps(mode, request.steps).num_steps
    except LoopfreeError as e:
        raise RequestError("steps", str(e)) from None
    settings = Settings(model.id, height, width, mode, steps, guidance)
    return Order(settings, [Item(prompt, image_seed(seed, 0, i)) for i in range(request.n)], seed)
