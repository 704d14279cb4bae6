"""``loopfree analyze``: the paper's analyses (Figs. 1, 8, 9, 10) for any teacher or student, the bundled toy
models by default. Each writes a PNG and a JSON into ``--out`` (default ``analysis/<analysis>``).

    loopfree analyze features                    # Fig. 1: encoder/decoder similarity of adjacent steps vs quality
    loopfree analyze noise --model a --model b   # Fig. 8: distribution of the students' noise predictions
    loopfree analyze interpolate --from "…" --to "…"   # Fig. 9: text-embedding interpolation
    loopfree analyze steps                       # Fig. 10: the student as a 2…50-step DDIM model
    loopfree analyze steps --model runs/tiue --prompts prompts.txt --clip clip-vit-g-14   # a real model: CLIP score per row
"""

from __future__ import annotations

import click

from loopfree.analysis import settings as defaults
from loopfree.cli import options


def _sampling(default: defaults.AnalysisSetup, prompts: bool = True):
    """The options that make a :class:`~loopfree.analysis.settings.AnalysisSetup`, with ``default``'s values."""
    decorators = [
        click.option("--prompts", type=click.Path(), default=None,
                     help="Prompt file (.txt, .jsonl, .csv, .parquet; see loopfree distill). Default: the toy world's held-out prompts."),
        click.option("--num-prompts", type=click.IntRange(1, None), default=default.num_prompts, show_default=True, help="Prompts used."),
        options.images_per_prompt(default.images_per_prompt),
        click.option("--batch-size", type=click.IntRange(1, None), default=default.batch_size, show_default=True, help="Images per sampler call."),
    ] if prompts else []
    decorators += [options.seed(), options.guidance(default.guidance), options.device(), options.dtype(), options.overwrite()]

    def apply(f):
        for decorator in reversed(decorators):
            f = decorator(f)
        return f

    return apply


def _run(analysis, default: defaults.AnalysisSetup, args: tuple, out: str, kwargs: dict) -> None:
    """``analysis(*args, sampling, out, overwrite, **rest)`` with the AnalysisSetup of the command's options (those it
    lacks keep ``default``'s values) and the options that are not AnalysisSetup's as ``rest``; says where it wrote."""
    from dataclasses import fields, replace

    overwrite = kwargs.pop("overwrite")
    setup = replace(default, **{f.name: kwargs.pop(f.name) for f in fields(default) if f.name in kwargs})
    click.echo(f"wrote {analysis(*args, setup, out, overwrite, **kwargs)}")


def _clip():
    return click.option("--clip", type=click.Path(), default=None,
                        help="A local transformers CLIP folder (as loopfree eval --clip takes it): every row gets "
                             "loopfree eval's CLIP score of its images, for any model.")


def _out(name: str):
    return options.out(f"analysis/{name}", f"Output folder for {name}.png and {name}.json.")


def _step_list(default: tuple[int, ...], help: str):
    return click.option("--steps", type=options.IntList(), default=",".join(map(str, default)), show_default=True, help=help)


@click.group()
def analyze() -> None:
    """The paper's analyses (its figures 1, 8, 9, 10) as PNG + JSON; the bundled toy models by default."""


@analyze.command()
@options.model("Model to analyse (default: the bundled toy teacher).")
@_step_list(defaults.FEATURE_STEPS, "DDIM step counts N to compare.")
@_clip()
@_out("features")
@_sampling(defaults.FEATURES)
def features(model, steps, out, **kwargs) -> None:
    """Encoder and decoder feature similarity of adjacent DDIM steps, and quality, against N (paper figure 1)."""
    from loopfree.analysis.features import run_features

    _run(run_features, defaults.FEATURES, (model, steps), out, kwargs)


@analyze.command()
@click.option("--model", "models", type=click.Path(), multiple=True,
              help="Student folder; repeat to compare several (default: the bundled TiUE student).")
@click.option("--teacher", type=click.Path(), default=None, help="Teacher whose ε is shown (default: the bundled toy teacher).")
@_out("noise")
@_sampling(defaults.NOISE)
def noise(models, teacher, out, **kwargs) -> None:
    """Students' decoder noise predictions against the teacher's ε and N(0, 1): histogram, moments, KL (figure 8).

    Students run unguided, as trained; --guidance is the teacher's (its ε as it samples)."""
    from loopfree.analysis.noise import run_noise

    _run(run_noise, defaults.NOISE, (list(models) or None, teacher), out, kwargs)


@analyze.command()
@options.model()
@click.option("--from", "source", default=defaults.FROM, show_default=True, help="Prompt at weight 0.")
@click.option("--to", "target", default=defaults.TO, show_default=True, help="Prompt at weight 1.")
@click.option("--method", type=click.Choice(defaults.METHODS), default=defaults.METHODS[0], show_default=True,
              help="Spherical or linear interpolation of the text embeddings.")
@click.option("--columns", type=click.IntRange(2, 64), default=defaults.COLUMNS, show_default=True, help="Interpolation weights, 0 to 1.")
@click.option("--rows", type=click.IntRange(1, 64), default=defaults.ROWS, show_default=True, help="Rows, each from its own x_T.")
@options.mode()
@options.steps()
@_out("interpolate")
@_sampling(defaults.INTERPOLATE, prompts=False)
def interpolate(model, source, target, method, columns, rows, mode, steps, out, **kwargs) -> None:
    """Images along the interpolation between two prompts' text embeddings, rows of fixed x_T (paper figure 9)."""
    from loopfree.analysis.interpolate import run_interpolate

    _run(run_interpolate, defaults.INTERPOLATE, (model, source, target, method, columns, rows, mode, steps), out, kwargs)


@analyze.command()
@options.model()
@_step_list(defaults.STUDENT_STEPS, "DDIM step counts N, each sampled with a full UNet per step and with the encoder shared.")
@_clip()
@_out("steps")
@_sampling(defaults.STEPS)
def steps(model, steps, out, **kwargs) -> None:
    """The model as one pass and as N-step DDIM, full UNet per step or encoder shared (paper figure 10)."""
    from loopfree.analysis.steps import run_steps

    _run(run_steps, defaults.STEPS, (model, steps), out, kwargs)
