"""The ``loopfree`` command line. Commands live in their own modules and are imported only when run, so
``loopfree --help`` answers without loading torch.

    loopfree demo
    loopfree generate "a red circle on a white background"
    loopfree distill --teacher path/to/sd21-base --prompts prompts.txt --out runs/tiue

Library code raises :class:`~loopfree.utils.errors.LoopfreeError` for bad input; here, and only here, it becomes
one line on stderr and exit code 2 (``Interrupted``: 128 + the signal number).
"""

from __future__ import annotations

import importlib
import logging

import click

from loopfree.utils.errors import Interrupted, LoopfreeError

#: command name -> "module:attribute"
COMMANDS = {
    "analyze": "loopfree.cli.analyze:analyze",
    "generate": "loopfree.cli.generate:generate",
    "distill": "loopfree.cli.distill:distill",
    "bench": "loopfree.cli.bench:bench",
    "demo": "loopfree.cli.demo:demo",
    "study": "loopfree.cli.study:study",
    "serve": "loopfree.cli.serve:serve",
    "toy": "loopfree.cli.toy:toy",
    "eval": "loopfree.cli.eval:eval",
    "export": "loopfree.cli.export:export",
}


class _QuietTorchvision(logging.Filter):
    """transformers warns at import that image processors fall back from torchvision to PIL; we use neither."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


class LazyGroup(click.Group):
    """A group whose commands are imported on first use; library errors become exit codes here."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            raise _UsageError(e.format_message()) from None

    def invoke(self, ctx: click.Context):
        logging.getLogger("transformers.utils.import_utils").addFilter(_QuietTorchvision())
        try:
            return super().invoke(ctx)
        except click.UsageError as e:  # a bad flag or value of a command: one line, not the usage text
            raise _UsageError(e.format_message()) from None
        except LoopfreeError as e:
            raise _UsageError(str(e)) from None
        except Interrupted as e:
            click.echo(str(e), err=True)
            raise click.exceptions.Exit(128 + e.signum) from None


class _UsageError(click.ClickException):
    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))  # always one line


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="loopfree")
def main() -> None:
    """Loop-free text-to-image diffusion: one encoder pass, K decoders in parallel (TiUE)."""
