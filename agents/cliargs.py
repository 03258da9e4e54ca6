"""Command-line options generated from a documented dataclass (the one source of every option).

:func:`add_dataclass_options` turns each field of a dataclass such as
:class:`~agents.config.TrainConfig` into an ``argparse`` option ``--field-name``: its help is the
field's ``metadata["help"]`` followed by its default, its allowed values are ``metadata["choices"]``,
booleans are flags (``--progress`` / ``--no-progress``), ``X | None`` fields accept ``none``, and dicts
take JSON. An option the user does not give leaves no attribute (``argparse.SUPPRESS``), so presets
and resumed configs keep their values, and ``--lora-rank none`` can still set a field to None.

:class:`OneLineParser` reports a bad option in one line (what was given, what was expected) instead
of argparse's usage block, and points to ``--help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Any

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line: ``prog: error: … (see prog --help)``."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Option help wrapped as usual; descriptions and epilogs (lists of algorithms, envs) kept as written."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=min(110, _terminal_width()))

    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        if isinstance(action, BoolFlag):
            return ""  # usage shows [--progress], help shows "--progress, --no-progress"
        return super()._format_args(action, default_metavar)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, BoolFlag):
            return ", ".join(action.option_strings)
        return super()._format_action_invocation(action)


def _terminal_width() -> int:
    import shutil

    return shutil.get_terminal_size((100, 24)).columns


def parse_bool(text: str) -> bool:
    """``true/false`` (also ``1/0``, ``yes/no``, ``on/off``), case-insensitive; anything else is refused."""
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(text)


class BoolFlag(argparse.Action):
    """``--name`` sets True, ``--no-name`` sets False; ``--name=false`` is accepted, any other value refused."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("default", argparse.SUPPRESS)
        super().__init__(option_strings, dest, nargs="?", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: D102
        negative = option_string is not None and option_string.startswith("--no-")
        if values is None:
            setattr(namespace, self.dest, not negative)
            return
        try:
            value = parse_bool(values)
        except ValueError:
            pos, neg = self.option_strings[0], self.option_strings[1]
            parser.error(f"{option_string} {values!r}: expected no value ({pos} or {neg}) or one of true/false")
        setattr(namespace, self.dest, value != negative)

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` → (X, True); anything else → (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def value_parser(tp: Any, name: str) -> typing.Callable[[str], Any]:
    """The function turning the command-line text of a field of type ``tp`` into its value.

    Raises ``argparse.ArgumentTypeError`` with "expected …" on text that does not parse.
    """
    inner, optional = _strip_optional(tp)
    origin = typing.get_origin(inner) or inner

    def parse(text: str) -> Any:
        if optional and text.strip().lower() == "none":
            return None
        try:
            if origin is bool:
                return parse_bool(text)
            if origin in (int, float, str):
                return origin(text)
            if origin in (dict, list):
                value = json.loads(text)
                if not isinstance(value, origin):
                    raise ValueError(text)
                return value
        except ValueError:
            kind = {int: "an integer", float: "a number", bool: "true or false",
                    dict: "a JSON object such as '{\"key\": 1}'", list: "a JSON list"}.get(origin, origin.__name__)  # fmt: skip
            raise argparse.ArgumentTypeError(f"{text!r}: expected {kind}{' or none' if optional else ''}") from None
        return text

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def format_default(value: Any) -> str:
    """How a default is shown in help: JSON for containers, ``none`` for None, else ``str``."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def add_dataclass_options(
    parser: argparse.ArgumentParser | Any,
    cls: type,
    *,
    skip: typing.Iterable[str] = (),
    choices: dict[str, typing.Sequence[Any]] | None = None,
    flags: dict[str, str] | None = None,
    notes: dict[str, str] | None = None,
) -> list[str]:
    """Add one option per field of ``cls`` (except ``skip``); return the field names added.

    ``choices`` overrides ``metadata["choices"]`` per field (for values known only at run time, such as
    the registered algorithms); ``flags`` renames options (``{"env_id": "--env"}``); ``notes`` adds a sentence to a field's help. Every option's help is ``metadata["help"]`` + its default; a field without
    help raises ``ValueError``, so an undocumented field cannot slip into the command line.
    """
    hints = typing.get_type_hints(cls)
    skip, choices = set(skip), dict(choices or {})
    added = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        help_text = f.metadata.get("help")
        if not help_text:
            raise ValueError(f"{cls.__name__}.{f.name} has no metadata['help']; expected documentation for --help")
        tp = hints[f.name]
        inner, optional = _strip_optional(tp)
        default = field_default(f)
        allowed = choices.get(f.name, f.metadata.get("choices"))
        flag = (flags or {}).get(f.name) or "--" + f.name.replace("_", "-")
        note = f" {notes[f.name]}" if notes and f.name in notes else ""
        text = f"{help_text}{note} (default: {format_default(default)})".replace("``", "").replace("%", "%%")
        if inner is bool and not optional:
            parser.add_argument(flag, "--no-" + flag[2:], dest=f.name, action=BoolFlag, help=text)
        else:
            kwargs: dict[str, Any] = dict(dest=f.name, type=value_parser(tp, f.name), default=argparse.SUPPRESS,
                                          help=text)  # fmt: skip
            if allowed is not None:
                kwargs["choices"] = list(allowed)
                kwargs["metavar"] = "{" + ",".join(format_default(c) for c in allowed) + "}"
            else:
                origin = typing.get_origin(inner) or inner
                kwargs["metavar"] = {int: "INT", float: "FLOAT", dict: "JSON", list: "JSON"}.get(origin, "TEXT")
                if f.name.endswith("_id"):
                    kwargs["metavar"] = "ID"
                if optional:
                    kwargs["metavar"] += "|none"
            parser.add_argument(flag, **kwargs)
        added.append(f.name)
    return added


def given_options(args: argparse.Namespace, names: typing.Iterable[str]) -> dict[str, Any]:
    """The options among ``names`` that the user gave (the others leave no attribute)."""
    return {n: getattr(args, n) for n in names if hasattr(args, n)}

