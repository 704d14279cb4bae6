"""One click option per field of a config dataclass (``DistillConfig``): the flag is the field name with
hyphens, the help text is the field's, and every option defaults to None so that only the flags actually
given override the YAML file and the defaults.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, TypeVar, get_args, get_origin, get_type_hints

import click

from loopfree.training.config import DistillConfig, _without_none

F = TypeVar("F", bound=Callable[..., Any])


def _split_list(item_type: click.ParamType) -> Callable[[click.Context, click.Parameter, str | None], list[Any] | None]:
    """Click callback turning "a,b,c" into a list of `item_type` values."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> list[Any] | None:
        if value is None:
            return None
        return [item_type.convert(item.strip(), param, ctx) for item in value.split(",") if item.strip()]

    return callback


def _option(f: dataclasses.Field, hint: Any, shown_default: Any = dataclasses.MISSING) -> Callable[[F], F]:
    """The click option for one config field; its default is None so that only given flags override.
    ``shown_default``: the default the command applies instead of the field's (shown in the help)."""
    hint = _without_none(hint)
    flag = "--" + f.name.replace("_", "-")
    text = f.metadata["help"]
    if shown_default is not dataclasses.MISSING:
        text += f" [default here: {','.join(map(str, shown_default)) if isinstance(shown_default, list) else shown_default}]"
    elif f.default not in (dataclasses.MISSING, None):
        text += f" [default: {f.default}]"
    elif f.default_factory is not dataclasses.MISSING:
        text += f" [default: {','.join(map(str, f.default_factory()))}]"
    if hint is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=text)
    if get_origin(hint) is Literal:
        return click.option(flag, f.name, type=click.Choice(get_args(hint)), default=None, help=text)
    if get_origin(hint) is list:
        item_type = click.types.convert_type(get_args(hint)[0])
        if f.metadata.get("repeatable"):
            return click.option(
                flag, f.name, type=item_type, multiple=True, callback=lambda ctx, p, v: list(v) or None, help=text
            )
        return click.option(flag, f.name, type=str, default=None, callback=_split_list(item_type), help=text)
    return click.option(flag, f.name, type=hint, default=None, help=text)


def config_options(cls: type = DistillConfig, only: tuple[str, ...] | None = None,
                   defaults: dict[str, Any] | None = None) -> Callable[[F], F]:
    """Decorator adding one click option per field of the config dataclass `cls`.

    Every option defaults to None, so the command receives exactly the given flags as non-None
    keyword arguments, ready to pass to `load_config` as overrides. Booleans are `--x/--no-x`,
    lists comma-separated (or a repeatable flag), Literal fields a choice. ``only``: a subset of the fields;
    ``defaults``: defaults the command applies in place of the dataclass's (for the help text).
    """
    hints = get_type_hints(cls)
    defaults = defaults or {}
    options = [_option(f, hints[f.name], defaults.get(f.name, dataclasses.MISSING))
               for f in dataclasses.fields(cls) if only is None or f.name in only]

    def decorate(command: F) -> F:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate
