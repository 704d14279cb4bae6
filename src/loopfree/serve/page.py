"""The web page (Gradio): a prompt → the student's images, each captioned with its share of the time of the
pipeline call that made it; optionally beside the teacher's DDIM with 4 and 50 steps from the same x_T. Requests go through the
same batcher as the API, so page and API users share the model fairly.

    loopfree serve        # then open http://127.0.0.1:7860
"""

from __future__ import annotations

import io

import gradio as gr
from PIL import Image
from pydantic import ValidationError

from loopfree.utils.errors import LoopfreeError
from loopfree.utils.vocabulary import MODES
from loopfree.serve.batcher import Batcher, Closed, QueueFull
from loopfree.serve.engine import Engine, Picture
from loopfree.serve.schemas import MAX_IMAGES, ImageRequest, Order, resolve, validation_message

TEACHER_STEPS = (4, 50)  # the teacher's DDIM steps shown beside the student
CSS = "#gallery img { image-rendering: pixelated; }"  # small images scaled up stay sharp


def label(order: Order) -> str:
    s = order.settings
    return f"{s.model} K={s.steps}" if s.mode == "loop_free" else f"{s.model} DDIM {s.steps}"


def caption(order: Order, picture: Picture) -> str:
    """The image's share of its call: the call's time over the images it made."""
    return f"{label(order)}: {picture.seconds * 1000 / picture.batch:.0f} ms"


def summary(orders: list[Order], results: list[list[Picture]]) -> str:
    """The seed, the size, and each model's calls with their times."""
    first = orders[0].settings
    lines = [f"seed **{orders[0].seed}** · {first.width}×{first.height} px · guidance {first.guidance:g} · "
             "each image's time is its share of the pipeline call that made it"]
    for order, pictures in zip(orders, results):
        calls = sorted({(p.seconds, p.batch) for p in pictures})
        times = (f"{seconds * 1000:.0f} ms for {n} image{'s' * (n > 1)}" for seconds, n in calls)
        lines.append(f"- {label(order)}: " + ", ".join(times))
    return "\n".join(lines)


def build_page(engine: Engine, batcher: Batcher, examples: list[str] | None = None) -> gr.Blocks:
    """The page for ``engine``'s student (and teacher, if any); ``examples``: prompts offered under the form."""
    student, teacher = engine.student, engine.teacher

    def generate(prompt: str, seed: float | None, count: float, mode: str, steps: float, guidance: float, compare: bool):
        try:
            first = resolve(ImageRequest(prompt=prompt, n=int(count), seed=None if seed is None else int(seed),
                                         steps=int(steps), guidance=float(guidance), mode=mode), engine)
            orders = [first] + [
                resolve(ImageRequest(prompt=prompt, model=teacher.id, n=int(count), seed=first.seed, steps=k,
                                     guidance=float(guidance), mode="loop"), engine)
                for k in (TEACHER_STEPS if compare and teacher is not None else ())
            ]
            results = [future.result() for future in [batcher.submit(o.settings, o.items) for o in orders]]
        except ValidationError as e:
            raise gr.Error(validation_message(e)) from None
        except (LoopfreeError, QueueFull, Closed) as e:
            raise gr.Error(str(e)) from None
        gallery = [(Image.open(io.BytesIO(pictures[i].png)), caption(order, pictures[i]))
                   for i in range(int(count)) for order, pictures in zip(orders, results)]
        columns = len(orders) if len(orders) > 1 else min(int(count), 4)
        return gr.Gallery(value=gallery, columns=columns), summary(orders, results)

    def default_steps(mode: str) -> int:
        return student.pipe.plan_steps(mode).num_steps

    # the gallery's PNGs live in gradio's cache folder: drop those older than an hour, hourly
    with gr.Blocks(title=f"loopfree · {student.id}", analytics_enabled=False, delete_cache=(3600, 3600)) as page:
        gr.Markdown(f"## loopfree · `{student.id}`\nOne pass per image: the UNet's encoder once, K decoders in parallel.")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", elem_id="prompt", placeholder="a red circle on a white background")
                with gr.Row():
                    seed = gr.Number(0, label="Seed (empty: random)", precision=0, minimum=0)
                    count = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Images")
                mode = gr.Radio(list(MODES), value="loop_free", label="Mode",
                                info="loop_free: one pass; loop: the same weights as a DDIM loop")
                steps = gr.Slider(1, 100, value=default_steps("loop_free"), step=1, label="Steps",
                                  info="K decoders (loop_free) or DDIM steps (loop)")
                guidance = gr.Slider(0, 10, value=1, step=0.5, label="Guidance", info="classifier-free; 1 = off")
                steps_shown = " and ".join(map(str, TEACHER_STEPS))
                compare = gr.Checkbox(False, visible=teacher is not None, elem_id="compare",
                                      label=f"Beside the teacher's DDIM with {steps_shown} steps (same x_T)")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Images", elem_id="gallery", columns=4, format="png", object_fit="contain")
                timing = gr.Markdown(elem_id="summary")
        if examples:
            gr.Examples([[p] for p in examples], inputs=[prompt], label="Example prompts")
        mode.change(default_steps, mode, steps)
        inputs = [prompt, seed, count, mode, steps, guidance, compare]
        for event in (button.click, prompt.submit):
            event(generate, inputs, [gallery, timing], concurrency_limit=None)
    return page
