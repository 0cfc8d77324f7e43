"""Command-line options built from the config dataclasses' fields, so each default, help text and flag
is written once: in the field's metadata (``config.option``).

``with_fields`` gives a command a Typer option for every field that names a flag, grouped in help
panels by the config's parts; the command takes them as ``**options`` and ``config_values`` hands
them back to the dataclass. ``flags_for_fields`` turns the fields an error names into those flags.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import MISSING, Field, fields
from typing import Annotated, NamedTuple, get_type_hints

import typer

from ..config import PARTS, CalibConfig
from ..heal.config import HealConfig


class Group(NamedTuple):
    """A config dataclass whose flagged fields become options of one help panel."""

    title: str | None  # the help panel (None: the default one)
    cls: type
    path: str = ""  # the fields' prefix in error messages: `calibration.samples`, `heal.steps`
    names: str = ""  # their parameters' prefix in the command (calibration_samples)


def _has_flag(f: Field) -> bool:
    return "flag" in f.metadata


def field_params(group: Group) -> list[inspect.Parameter]:
    """A keyword parameter for each field of the group's dataclass that names a flag, annotated as
    Typer's option: its flag (and short one), help and default from the field, in the group's panel."""
    hints = get_type_hints(group.cls)
    params = []
    for f in filter(_has_flag, fields(group.cls)):
        meta = f.metadata
        kind = meta.get("type", hints[f.name])
        if "type" in meta and f.default is None:
            kind = kind | None
        flags = (meta["flag"], meta["short"]) if "short" in meta else (meta["flag"],)
        info = typer.Option(*flags, help=meta["help"], rich_help_panel=group.title)
        default = f.default if f.default is not MISSING else f.default_factory()
        params.append(inspect.Parameter(group.names + f.name, inspect.Parameter.KEYWORD_ONLY,
                                        annotation=Annotated[kind, info], default=default))
    return params


def _panel(param: inspect.Parameter) -> str | None:
    info = next(iter(getattr(param.annotation, "__metadata__", ())), None)
    return getattr(info, "rich_help_panel", None)


def with_fields(*groups: Group):
    """Give a command ``def cmd(<hand-written options>, **options)`` an option for every flagged field
    of ``groups``, in the signature Typer reads: the hand-written options of the default panel, then
    each group's panel (its hand-written options first, then its fields), then the hand-written
    options of other panels. Typer passes them all by name."""

    def decorate(func):
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
               for p in inspect.signature(func, eval_str=True).parameters.values()
               if p.kind is not inspect.Parameter.VAR_KEYWORD]
        titles = [g.title for g in groups if g.title is not None]
        ordered = [p for p in own if _panel(p) is None]
        for group in groups:
            ordered += [p for p in own if group.title is not None and _panel(p) == group.title] + field_params(group)
        ordered += [p for p in own if _panel(p) is not None and _panel(p) not in titles]
        func.__signature__ = inspect.Signature(ordered, return_annotation=None)
        return func

    return decorate


def config_values(options: dict, group: Group) -> dict:
    """The values of the group's flagged fields among a command's ``options``, by field name."""
    return {f.name: options[group.names + f.name] for f in filter(_has_flag, fields(group.cls))}


def field_flags(*groups: Group) -> dict[str, str]:
    """Each flagged field's path (``rank``, ``calibration.samples``, ``heal.steps``) and its long flag."""
    return {g.path + f.name: f.metadata["flag"].split("/")[0] for g in groups for f in filter(_has_flag, fields(g.cls))}


COMPRESS_GROUPS = tuple(Group(title, part, *(("calibration.", "calibration_") if part is CalibConfig else ()))
                        for title, part in PARTS.items())  # the compress command's options, a panel a part
CALIB_GROUP = next(g for g in COMPRESS_GROUPS if g.cls is CalibConfig)
HEAL_GROUP = Group("Training", HealConfig, "heal.")  # the heal command's
FIELD_FLAGS = field_flags(*COMPRESS_GROUPS, HEAL_GROUP)  # `rank`: --rank, `calibration.samples`: --calib-samples


def flags_for_fields(command, message: str) -> str:
    """Each backquoted field of ``message`` as the command's flag for it.

    A config field takes the flag its metadata names (``FIELD_FLAGS``) where the command has it; any
    other name (``eval.task``, ``force``) the flag of the command's parameter named ``eval_task``,
    else ``task``; a name no option sets keeps its name."""
    params, opts = {}, set()
    for cmd in [command, *getattr(command, "commands", {}).values()]:
        for p in cmd.params:
            opts.update(p.opts)
            flags = [o for o in p.opts if o.startswith("--")]
            params.setdefault(p.name, max(flags, key=len) if flags else p.name.upper())

    def flag(m: re.Match) -> str:
        path = m.group(1)
        if FIELD_FLAGS.get(path) in opts:
            return FIELD_FLAGS[path]
        for name in (path.replace(".", "_"), path.rpartition(".")[2]):
            if name in params:
                return params[name]
        return path

    return re.sub(r"`([a-z_][a-z0-9_.]*)`", flag, message)
