"""Checking a sink's options against its options class's annotations.

A sink declares its options as a dataclass (:attr:`SinkSpec.options
<listening_core.hookspecs.SinkSpec.options>`). :func:`validate_options` checks what a caller
gives (``None``, a ``dict`` or an instance) against the class's annotations, converts where that
is lossless and expected, and raises :class:`~listening_core.errors.OptionsError` naming the
option, the expected type and the value, with the valid options listed (and a "did you mean")
for an unknown one. :func:`describe` lists a sink's options for help texts.

The registry (:mod:`listening_core.plugins`) calls these; their names resolve there too.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import enum
import os
import re
import reprlib
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Literal, Union

from .errors import InvalidPluginError, OptionsError
from .hookspecs import SinkSpec

__all__ = ["OptionInfo", "describe", "format_default", "validate_options"]


def _from(spec: SinkSpec) -> str:
    """`` (distribution version)`` of the plugin providing ``spec``, for messages; empty if none."""
    return f" ({spec.distribution} {spec.version})" if spec.distribution else ""


# ------------------------------------------------------------------------------ options: types


class _Mismatch(Exception):
    """A value does not fit an annotation (internal; becomes an :class:`OptionsError`)."""

    def __init__(self, expected: Any, value: object, detail: str | None = None) -> None:
        super().__init__(expected, value, detail)
        self.expected = expected
        self.value = value
        self.detail = detail

    def __str__(self) -> str:
        text = f"must be {_expected(self.expected)}, got {_show(self.value)}"
        return f"{text}: {self.detail}" if self.detail else text


def _show(value: object) -> str:
    return f"{reprlib.repr(value)} ({type(value).__name__})"


def _is_union(tp: object) -> bool:
    origin = typing.get_origin(tp)
    return origin is Union or origin is types.UnionType


def _type_str(tp: Any) -> str:
    """A short, Python-like spelling of an annotation: ``int | None``, ``'a' | 'b'``, ``Path``."""
    if tp is type(None) or tp is None:
        return "None"
    if tp is Any:
        return "Any"
    if tp is Ellipsis:
        return "..."
    if isinstance(tp, list):  # the argument list of Callable[[int, str], None]
        return "[" + ", ".join(_type_str(arg) for arg in tp) + "]"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return " | ".join(repr(arg) for arg in args)
    if _is_union(tp):
        return " | ".join(_type_str(arg) for arg in args)
    if origin is not None:
        name = "Callable" if origin is collections.abc.Callable else getattr(origin, "__name__", repr(origin))
        return f"{name}[{', '.join(_type_str(arg) for arg in args)}]" if args else name
    if isinstance(tp, type):
        return tp.__name__
    return repr(tp).removeprefix("typing.")


def _expected(tp: Any) -> str:
    """How an error message says what an annotation accepts."""
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(arg) for arg in typing.get_args(tp))
    if _is_union(tp):
        return " or ".join(_expected(arg) for arg in typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        members = list(tp)
        names = ", ".join(f"{tp.__name__}.{m.name}" for m in members)
        values = ", ".join(repr(m.value) for m in members)
        return f"one of {names} (or their values {values})"
    if isinstance(tp, type) and issubclass(tp, PurePath):
        return f"{tp.__name__} or str"
    return _type_str(tp)


def _coerce(value: object, tp: Any) -> Any:
    """Check ``value`` against annotation ``tp``; return it, converted where allowed.

    Raises :class:`_Mismatch` when it does not fit.
    """
    if tp is Any or tp is object:
        return value
    supertype = getattr(tp, "__supertype__", None)  # typing.NewType
    if supertype is not None:
        return _coerce(value, supertype)
    if tp is type(None) or tp is None:
        if value is None:
            return None
        raise _Mismatch(type(None), value)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        for choice in args:
            if value == choice and type(value) is type(choice):
                return choice
        raise _Mismatch(tp, value)
    if _is_union(tp):
        if value is None and type(None) in args:
            return None
        alternatives = [arg for arg in args if arg is not type(None)]
        last: _Mismatch | None = None
        for arg in alternatives:
            try:
                return _coerce(value, arg)
            except _Mismatch as exc:
                last = exc
        detail = last.detail if last is not None and len(alternatives) == 1 else None
        raise _Mismatch(tp, value, detail)
    if origin is collections.abc.Callable or tp is collections.abc.Callable:
        if callable(value):
            return value
        raise _Mismatch(tp, value)
    if origin is tuple or tp is tuple:
        return _coerce_tuple(value, tp, args)
    if origin in (list, collections.abc.Sequence) or tp is list:
        if not isinstance(value, list | tuple):
            raise _Mismatch(tp, value)
        return (
            [_coerce_item(item, args[0], index, tp, value) for index, item in enumerate(value)]
            if args
            else list(value)
        )
    if origin in (dict, collections.abc.Mapping) or tp is dict:
        return _coerce_dict(value, tp, args)
    if origin is not None:
        if isinstance(origin, type) and not isinstance(value, origin):
            raise _Mismatch(tp, value)
        return value
    return _coerce_plain(value, tp)


def _coerce_item(item: object, item_tp: Any, index: int, tp: Any, value: object) -> Any:
    try:
        return _coerce(item, item_tp)
    except _Mismatch as exc:
        raise _Mismatch(tp, value, f"item {index} {exc}") from None


def _coerce_tuple(value: object, tp: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    if not isinstance(value, list | tuple):
        raise _Mismatch(tp, value)
    if not args:
        return tuple(value)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce_item(item, args[0], i, tp, value) for i, item in enumerate(value))
    if len(value) != len(args):
        raise _Mismatch(tp, value, f"expected {len(args)} items, got {len(value)}")
    return tuple(
        _coerce_item(item, arg, i, tp, value) for i, (item, arg) in enumerate(zip(value, args, strict=True))
    )


def _coerce_dict(value: object, tp: Any, args: tuple[Any, ...]) -> dict[Any, Any]:
    if not isinstance(value, Mapping):
        raise _Mismatch(tp, value)
    if not args:
        return dict(value)
    key_tp, value_tp = args
    result: dict[Any, Any] = {}
    for key, item in value.items():
        try:
            result[_coerce(key, key_tp)] = _coerce(item, value_tp)
        except _Mismatch as exc:
            raise _Mismatch(tp, value, f"at key {key!r}: {exc}") from None
    return result


def _coerce_plain(value: object, tp: Any) -> Any:
    if not isinstance(tp, type):
        return value  # a typing construct we cannot check (TypeVar, ...): accept as is
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, float):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
    elif issubclass(tp, PurePath):
        if isinstance(value, tp):
            return value
        if isinstance(value, str | os.PathLike):
            return tp(value)
    elif issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        try:
            return tp(value)
        except ValueError:
            pass
        if isinstance(value, str) and value in tp.__members__:
            return tp.__members__[value]
    elif isinstance(value, tp):
        return value
    raise _Mismatch(tp, value)


# ---------------------------------------------------------------------------- options: checking


@dataclass(frozen=True, slots=True)
class OptionInfo:
    """One option of a sink, as :func:`describe` reports it."""

    name: str
    """The option's name (a field of the options class)."""
    type_str: str
    """Its annotation, spelled briefly: ``int``, ``Path | None``, ``'fast' | 'slow'``."""
    default: Any
    """Its default value (``default_factory`` already called)."""
    help: str
    """One line from ``field(metadata={"help": ...})``; empty if the plugin gave none."""

    def __str__(self) -> str:
        text = f"{self.name}: {self.type_str} = {format_default(self.default)}"
        return f"{text} — {self.help}" if self.help else text


def format_default(value: object, repr_: Callable[[object], str] = reprlib.repr) -> str:
    """An option's default as listings show it: ``'recordings'``, ``128``, ``Mode.FAST``."""
    if isinstance(value, PurePath):
        return repr(str(value))
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, types.FunctionType | types.BuiltinFunctionType | type):
        return value.__qualname__
    return repr_(value)


def _init_fields(cls: type[Any]) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _type_hints(spec: SinkSpec) -> dict[str, Any]:
    try:
        return typing.get_type_hints(spec.options)
    except Exception as exc:
        raise InvalidPluginError(
            f"sink {spec.name!r}{_from(spec)}: cannot resolve the annotations of its options class "
            f"{spec.options.__qualname__}: {type(exc).__name__}: {exc}; define the class and the "
            "types it names at module level",
        ) from exc


def describe(spec: SinkSpec) -> list[OptionInfo]:
    """List the options of ``spec``'s sink in declaration order: name, type, default, help."""
    hints = _type_hints(spec)
    return [
        OptionInfo(
            name=name,
            type_str=_type_str(hints.get(name, Any)),
            default=_default_of(f),
            help=str(f.metadata.get("help", "")),
        )
        for name, f in _init_fields(spec.options).items()
    ]


def _options_listing(spec: SinkSpec) -> str:
    infos = describe(spec)
    if not infos:
        return f"sink {spec.name!r} takes no options"
    return "valid options:\n" + "\n".join(f"  {info}" for info in infos)


def _did_you_mean(word: str, candidates: Iterable[str]) -> list[str]:
    return difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.6)


def _or_list(words: Sequence[str]) -> str:
    quoted = [repr(w) for w in words]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _mentioned_option(message: str, names: Iterable[str]) -> str | None:
    found = [name for name in names if re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", message)]
    return found[0] if len(found) == 1 else None


def validate_options(spec: SinkSpec, options: object = None) -> Any:
    """Check ``options`` for ``spec``'s sink and return an instance of ``spec.options``.

    ``options`` is ``None`` (all defaults), a mapping of option names to values, or an instance
    of the options class (returned as is when every field already has the right type).
    Values are checked against the field annotations and converted where that is lossless
    and expected (``str`` → ``Path``, ``int`` → ``float``, ``list`` → ``tuple``, an enum value
    or name → the member). The options class's ``__post_init__`` runs on the result.

    Raises :class:`OptionsError` for an unknown option (listing the valid ones), an ill-typed
    value (naming the option, the expected type and the value) or a value ``__post_init__``
    rejects; :class:`InvalidPluginError` if the options class's annotations cannot be resolved.
    """
    cls = spec.options
    fields = _init_fields(cls)
    given: dict[str, Any]
    if options is None:
        given = {}
    elif isinstance(options, cls):
        given = {name: getattr(options, name) for name in fields}
    elif isinstance(options, Mapping):
        given = dict(options)
        unknown = [key for key in given if key not in fields]
        if unknown:
            raise _unknown_options_error(spec, unknown, fields)
    else:
        raise OptionsError(
            f"sink {spec.name!r}: options must be None, a dict or a {cls.__qualname__}, "
            f"got {type(options).__qualname__}",
            sink=spec.name,
        )
    hints = _type_hints(spec)
    values: dict[str, Any] = {}
    for name, f in fields.items():
        value = given[name] if name in given else _default_of(f)
        try:
            values[name] = _coerce(value, hints.get(name, Any))
        except _Mismatch as exc:
            raise OptionsError(
                f"sink {spec.name!r}: option {name!r} {exc}", sink=spec.name, option=name
            ) from None
    if isinstance(options, cls) and all(_same(values[name], given[name]) for name in fields):
        return options
    try:
        return cls(**values)
    except OptionsError as exc:
        if exc.sink is not None:
            raise
        raise OptionsError(f"sink {spec.name!r}: {exc}", sink=spec.name, option=exc.option) from exc
    except (ValueError, TypeError) as exc:
        option = _mentioned_option(str(exc), fields)
        if option is not None:
            where = f"option {option!r} = {reprlib.repr(values[option])}"
        else:
            where = "options " + (
                ", ".join(f"{k}={reprlib.repr(v)}" for k, v in given.items()) or "(defaults)"
            )
        raise OptionsError(
            f"sink {spec.name!r}: {where} rejected: {exc}", sink=spec.name, option=option
        ) from exc


def _same(converted: object, original: object) -> bool:
    """Whether checking left a value as it was (a rebuilt but equal tuple or list counts)."""
    if converted is original:
        return True
    if type(converted) is not type(original) or not isinstance(original, list | tuple):
        return False
    assert isinstance(converted, list | tuple)
    return len(converted) == len(original) and all(map(_same, converted, original))


def _unknown_options_error(spec: SinkSpec, unknown: list[Any], fields: Mapping[str, object]) -> OptionsError:
    parts = []
    for key in unknown:
        if not isinstance(key, str):
            parts.append(f"{key!r} (option names are strings)")
            continue
        near = _did_you_mean(key, fields)
        parts.append(f"{key!r} (did you mean {_or_list(near)}?)" if near else repr(key))
    noun = "option" if len(unknown) == 1 else "options"
    first = unknown[0] if isinstance(unknown[0], str) else None
    return OptionsError(
        f"sink {spec.name!r} has no {noun} {', '.join(parts)}\n{_options_listing(spec)}",
        sink=spec.name,
        option=first,
    )
