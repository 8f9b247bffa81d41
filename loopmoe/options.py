"""Options as dataclass fields, and the command line generated from them.

Every setting a user can give (the `RunConfig` sections, `CompareOptions`, the options of each
subcommand) is a dataclass field whose type, default and help live in that one place: the help is
``field(metadata={"help": ...})``, written with ``option(default, help=...)``. ``add_options``
turns such a dataclass into argparse arguments:

- the flag is the field name with dashes (``seq_len`` -> ``--seq-len``) unless the field names
  its own ``flag``; ``aliases`` are further flags for the same field;
- the annotation gives the parsing: ``int``, ``float``, ``str``, ``Path``; ``bool`` is a switch;
  ``Literal[...]`` or a ``StrEnum`` gives the choices; ``X | None`` also takes ``none`` (as Python
  None, except where ``"none"`` is itself one of the choices); ``tuple[X, ...]`` and
  ``tuple[X, Y]`` take comma-separated values; ``list[X]`` is a repeatable flag (or, positional,
  any number of values);
- a field without a default is required; every help line ends with the default.

``add_overrides`` does the same for a run-config section, as flags that are overrides:
``--train.max_steps 100`` is ``train.max_steps=100`` (typed and checked by the run config).

``parse_text`` and ``coerce_value`` are the one reading of a value against its annotation: flags,
``section.key=value`` overrides and TOML tables all go through them.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import types
from collections.abc import Iterator, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from loopmoe.errors import ConfigError
from loopmoe.text import suggest

MISSING: Any = dataclasses.MISSING
OVERRIDES_DEST = "option_overrides"  # where add_overrides' flags collect their `section.key=value` strings


def option(
    default: Any = MISSING,
    *,
    help: str,
    default_factory: Any = MISSING,
    flag: str | None = None,
    aliases: tuple[str, ...] = (),
    positional: bool = False,
    metavar: str | None = None,
    group: str | None = None,
    shown: str | None = None,
    cli: bool = True,
) -> Any:
    """A dataclass field with its help and command-line spelling (``flag``, ``aliases``, ``positional``,
    ``metavar``, the help ``group``, ``shown``: what the default means when its value does not say,
    e.g. ``None``; ``cli=False`` keeps it off the command line)."""
    metadata = {
        "help": help,
        "shown": shown,
        "flag": flag,
        "aliases": aliases,
        "positional": positional,
        "metavar": metavar,
        "group": group,
        "cli": cli,
    }
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def help_of(cls: type, name: str) -> str:
    """The help of field ``name`` of ``cls``: options that mean the same setting share it."""
    return _field(cls, name).metadata["help"]


def flag_of(cls: type, name: str) -> str:
    """The command-line flag of field ``name`` of ``cls`` (for error messages)."""
    return _field(cls, name).metadata.get("flag") or "--" + name.replace("_", "-")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()  # type: ignore[operator]  # typeshed types the unset sentinel as a callable field
    return MISSING


def _show(f: dataclasses.Field, toml: bool = False) -> str:
    """`` (default: X)`` for the help of ``f``: X as it would be typed (``toml``: as an override value),
    or ``shown``."""
    if f.metadata.get("shown"):
        return f" (default: {f.metadata['shown']})"
    value = _default(f)
    if value is False and not toml:
        return ""  # a switch that is off unless given
    return f" (default: {_text(value, toml)})"


def _text(value: Any, toml: bool = False) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if toml and isinstance(value, (tuple, list)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if isinstance(value, list):  # a repeatable flag
        return ", ".join(str(v) for v in value) or "none"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "''"
    return str(value) if value != "" else "''"


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(get_args(hint)) == 2:
            return args[0], True
    return hint, False


NONE_WORDS = ("none", "null")


def choices_of(hint: Any) -> tuple[str, ...]:
    """The string choices a ``Literal`` or ``StrEnum`` annotation allows (inside ``X | None`` too); () otherwise."""
    inner, _ = _unwrap_optional(hint)
    if get_origin(inner) is Literal:
        return tuple(str(a) for a in get_args(inner))
    if isinstance(inner, type) and issubclass(inner, StrEnum):
        return tuple(member.value for member in inner)
    return ()


def _is_text(hint: Any) -> bool:
    inner, _ = _unwrap_optional(hint)
    return inner in (str, Path) or bool(choices_of(inner))


def parse_text(text: str, hint: Any) -> Any:
    """A value typed as text (a flag, a ``section.key=value`` override) read for a field annotated ``hint``.

    ``none``/``null`` is the choice ``"none"`` where that is one of the field's choices, else Python
    None (``X | None`` fields; any other field then rejects it by type). Text fields keep the text
    as typed; other values are TOML literals (numbers, booleans, lists), a bare word staying a string.
    """
    text = text.strip()
    if text.lower() in NONE_WORDS:
        if "none" in choices_of(hint):
            return "none"
        return None
    if _is_text(hint):
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def unknown_key_hint(name: str, options: list[str], prefix: str = "") -> str:
    """`; did you mean ...?`, or the valid names when none is close."""
    return "; " + (suggest(name, options, prefix) or f"valid keys: {', '.join(prefix + o for o in sorted(options))}")


def coerce_value(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a type hint, allowing int->float and list->tuple; ValueError otherwise."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce_value(key, value, arg)
            except ValueError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be None")
    if choices := choices_of(hint):
        if value not in choices:
            raise ConfigError(
                f"{key} = {value!r}: must be one of {', '.join(repr(a) for a in choices)}"
                + (f"; {close}" if isinstance(value, str) and (close := suggest(value, list(choices))) else "")
            )
        return hint(value) if origin is not Literal else value
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} = {value!r}: expected a list, e.g. [0, 1, 2]")
        return tuple(coerce_value(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key} = {value!r}: expected a list of {len(args)} values, e.g. [0.9, 0.95]")
        return tuple(coerce_value(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} = {value!r}: expected a table")
        return dict(value)
    if hint is Path and isinstance(value, str):
        return Path(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (hint in (int, float) and isinstance(value, bool)) or not isinstance(value, hint):
        raise ConfigError(f"{key} = {value!r}: expected {hint.__name__}, got {type(value).__name__}")
    return value


def _scalar(hint: Any) -> Any:
    """A parser of one command-line value of type ``hint`` (int, float, str, Path, a StrEnum or a Literal).

    Numbers are read by ``parse_text`` and checked by ``coerce_value``, as overrides and TOML values
    are; text and choices stay the text typed (argparse checks choices and names them).
    """
    if not (choices_of(hint) or hint in (int, float, str, Path)):
        raise TypeError(f"no command-line parser for {hint!r}; give the field cli=False or a supported type")
    if hint is Path:
        return Path
    if hint is str or choices_of(hint):
        return str

    def parse(text: str) -> Any:
        return coerce_value(hint.__name__, parse_text(text, hint), hint)

    parse.__name__ = hint.__name__  # argparse: "invalid int value: '1.5'"
    return parse


_EXAMPLES = {int: "0,1,2", float: "0.9,0.95", str: "a,b", Path: "a,b"}


def _comma_separated(hint: Any) -> Any:
    """``tuple[X, ...]`` / ``tuple[X, Y]`` from ``"a,b"`` (empty items dropped, so ``''`` is empty)."""
    args = get_args(hint)
    variadic = len(args) == 2 and args[1] is Ellipsis
    item_hints = list(args[:1] if variadic else args)
    kinds = [_scalar(a) for a in item_hints]

    def parse(text: str) -> tuple:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not variadic and len(items) != len(kinds):
            raise argparse.ArgumentTypeError(f"expected {len(kinds)} comma-separated values, got {text!r}")
        try:
            return tuple(k(t) for t, k in zip(items, kinds * len(items) if variadic else kinds))
        except ValueError:
            first = item_hints[0] if item_hints[0] in _EXAMPLES else str
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {first.__name__} values, e.g. {_EXAMPLES[first]}; got {text!r}"
            ) from None

    parse.__name__ = "comma-separated"
    return parse


def _or_none(parse: Any, hint: Any) -> Any:
    def parse_optional(text: str) -> Any:
        return parse(text) if parse_text(text, hint) is not None else None

    parse_optional.__name__ = getattr(parse, "__name__", "value")
    return parse_optional


def metavar_of(hint: Any, comma: bool = False) -> str:
    """``INT``, ``{a,b}``, ``INT,...`` (``comma``: tuples typed as a,b) or ``[FLOAT, FLOAT]`` (TOML lists)."""
    inner, _ = _unwrap_optional(hint)
    if choices := choices_of(inner):
        return "{" + ",".join(choices) + "}"
    if get_origin(inner) is tuple:
        names = [a.__name__.upper() for a in get_args(inner) if a is not Ellipsis]
        if comma:
            return ",".join(names) + (",..." if Ellipsis in get_args(inner) else "")
        return f"[{', '.join(names)}]"
    if get_origin(inner) is list:
        return metavar_of(get_args(inner)[0])
    return getattr(inner, "__name__", "VALUE").upper()


def _kwargs(hint: Any, default: Any) -> dict[str, Any]:
    """argparse keyword arguments that parse a value of type ``hint``."""
    inner, optional = _unwrap_optional(hint)
    origin = get_origin(inner)
    if inner is bool:
        return {"action": "store_true"} if default is False else {"action": argparse.BooleanOptionalAction}
    if origin is list:
        return {"type": _scalar(get_args(inner)[0]), "action": "append"}
    if origin is tuple:
        parse = _comma_separated(inner)
        return {"type": _or_none(parse, hint) if optional else parse}
    kwargs: dict[str, Any] = {"type": _or_none(_scalar(inner), hint) if optional else _scalar(inner)}
    if choices := choices_of(inner):
        kwargs["choices"] = (get_args(inner) if get_origin(inner) is Literal else choices) + (
            (None,) if optional and "none" not in choices else ()
        )
    return kwargs


def _group(parser: Any, groups: dict[str, Any], title: str | None) -> Any:
    if title is None:
        return parser
    if title not in groups:
        groups[title] = parser.add_argument_group(title)
    return groups[title]


def _cli_fields(cls: type) -> Iterator[dataclasses.Field]:
    """The fields of ``cls`` that appear on the command line; each must carry its help."""
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} has no help: declare it with option(..., help=...)")
        yield f


def add_options(parser: argparse.ArgumentParser, cls: type, *, given_only: bool = False) -> None:
    """One argparse argument per field of the dataclass ``cls`` (see the module docstring).

    ``given_only``: a flag that is not typed leaves no attribute in the namespace (its default still
    shows in the help), so that ``options_from(cls, namespace, base)`` can tell typed flags, which
    override ``base`` (e.g. options read from a config file), from defaults, which do not."""
    hints = get_type_hints(cls)
    groups: dict[str, Any] = {}
    for f in _cli_fields(cls):
        meta = f.metadata
        default = _default(f)
        kwargs = _kwargs(hints[f.name], default)
        help_text = meta["help"]
        if meta["positional"]:
            if kwargs.get("action") == "append":
                kwargs = {"type": kwargs["type"], "nargs": "*", "default": default}
            elif default is not MISSING:
                kwargs.update(nargs="?", default=default)
            if meta["metavar"]:
                kwargs["metavar"] = meta["metavar"]
            _group(parser, groups, meta["group"]).add_argument(f.name, help=help_text.replace("%", "%%"), **kwargs)
            continue
        if default is MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
            if kwargs.get("action") == "append":
                kwargs["default"] = list(default)
            if given_only:
                kwargs["default"] = argparse.SUPPRESS
            help_text += _show(f)
        if kwargs.get("action") not in ("store_true", argparse.BooleanOptionalAction):
            kwargs["metavar"] = meta["metavar"] or metavar_of(hints[f.name], comma=True)
        flags = [meta["flag"] or "--" + f.name.replace("_", "-"), *meta["aliases"]]
        _group(parser, groups, meta["group"]).add_argument(
            *flags, dest=f.name, help=help_text.replace("%", "%%"), **kwargs
        )


def options_from(cls: type, namespace: argparse.Namespace, base: Any = None) -> Any:
    """The dataclass ``cls`` from parsed arguments: fields off the command line (or, with
    ``add_options(given_only=True)``, not typed) keep their defaults, or their values in ``base``."""
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if hasattr(namespace, f.name)}
    return cls(**values) if base is None else dataclasses.replace(base, **values)


class _Override(argparse.Action):
    """Appends ``key=VALUE`` to the namespace's override list, in command-line order."""

    def __init__(self, *args: Any, key: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.key = key

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        items = list(getattr(namespace, self.dest, None) or [])
        setattr(namespace, self.dest, [*items, f"{self.key}={values}"])


def add_overrides(parser: argparse.ArgumentParser, section: str, cls: type, title: str, description: str) -> None:
    """One flag ``--SECTION.KEY VALUE`` per field of the run-config section ``cls``: the override
    ``SECTION.KEY=VALUE``, collected in ``namespace.option_overrides`` (VALUE is read like an override's)."""
    hints = get_type_hints(cls)
    add_override_flags(
        parser.add_argument_group(title, description),
        section,
        [
            (f.name, f.metadata["aliases"], metavar_of(hints[f.name]), f.metadata["help"] + _show(f, toml=True))
            for f in _cli_fields(cls)
        ],
    )


def add_override_flags(group: Any, section: str, keys: Sequence[tuple[str, tuple[str, ...], str, str]]) -> None:
    """``--SECTION.KEY VALUE`` (and ``--SECTION.KEY=VALUE``) flags that append the override
    ``SECTION.KEY=VALUE`` to ``namespace.option_overrides``, for keys given as (name, aliases, metavar, help)."""
    for name, aliases, metavar, help_text in keys:
        key = f"{section}.{name}"
        group.add_argument(
            f"--{key}",
            *aliases,
            action=_Override,
            key=key,
            dest=OVERRIDES_DEST,
            default=argparse.SUPPRESS,
            metavar=metavar,
            help=help_text.replace("%", "%%"),
        )


def given_overrides(namespace: argparse.Namespace) -> list[str]:
    """The ``section.key=value`` strings of the ``add_overrides`` flags given, in order."""
    return list(getattr(namespace, OVERRIDES_DEST, []))
