"""Planning options: declared once, as fields of ``PlanConfig``, and read from there by every front end.

Each option is a dataclass field made by ``option``: its default, its help text, its check (a type,
a range, or the registry whose names it takes) and how the command line and a recipe spell it.
``to_auglocal`` / ``build_plan`` take a ``PlanConfig`` or keyword overrides of its fields
(``resolve``); ``auglocal-convert`` generates its flags from the fields (``add_arguments``) and a
recipe its ``conversion:`` section (``training/config.py``); an error about an option is raised
once, as ``AugLocalError.bad_value(field, value, problem)``, and each front end words the field its
own way (``cli_name``, ``recipe_name``). Adding an option is one field and the code that uses it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import numbers
import types
import typing
from collections.abc import Callable, Mapping

from .errors import AugLocalError

__all__ = ["option", "options_of", "resolve", "validate", "add_arguments", "from_arguments", "cli_name",
           "recipe_name", "word_options"]


def option(default=None, help: str = "", *, choices: str | tuple | None = None, kind: str = "",
           low: float | None = None, most: float | None = None, problem: str = "",
           check: Callable | None = None, cli: dict | bool = True, recipe: bool = True,
           keyword: str | None = None, measured: bool = False, factory: Callable | None = None):
    """A ``PlanConfig`` field that is a planning option.

    ``choices``: the names it takes, a tuple or ``"module:NAME"`` of a registry in this package (read
    when checked, so whatever is registered by then is valid); ``kind`` names one of them in errors
    ("a rule"). ``low`` / ``most``: its range; ``problem``: the error's wording for a value of the
    wrong type or out of range (default: "is not an integer >= low"). ``check(value)``: a check of
    its own, raising ``AugLocalError.bad_value`` (input sizes, class counts). ``cli``: False for no
    flag, or argparse keywords for it (``nargs``, ``metavar``, ``short``, ``required``); ``recipe``:
    False when a recipe sets it from another section (the input size from the data). ``keyword``:
    the Python keyword when it differs from the field (``model_name`` for ``model``). ``measured``:
    filled in by planning (the input's dtype and layout), never given.
    """
    meta = {"option": not measured, "help": help, "choices": _lazy(choices) if choices is not None else None,
            "choices_from": choices,
            "kind": kind, "low": low, "above": False, "most": most, "hint": "", "problem": problem,
            "check": check, "cli": cli, "recipe": recipe and not measured, "keyword": keyword}
    if low is None:
        del meta["low"]  # the recipe checker reads a range only where "low" is set
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _lazy(choices: str | tuple) -> Callable[[], tuple]:
    return lambda: tuple(_registry(choices))


def _registry(choices: str | tuple):
    """The object ``choices`` names (``"rules:RULES"``: a registry, whose entries may have a summary)."""
    if isinstance(choices, str):
        module, name = choices.split(":")
        return getattr(importlib.import_module(f"auglocal_fx.{module}"), name)
    return choices


def options_of(cls) -> list[dataclasses.Field]:
    """The option fields of ``cls`` (measured fields left out), in declaration order."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("option")]


def _keyword(f: dataclasses.Field) -> str:
    return f.metadata.get("keyword") or f.name


def resolve(cls, base, overrides: dict, what: str = "to_auglocal"):
    """A validated ``cls`` (``PlanConfig``) from ``base`` (an instance, or an int: the first option,
    the number of blocks; None: the defaults) and keyword ``overrides`` of its options."""
    fields = {_keyword(f): f for f in options_of(cls)}
    unknown = [k for k in overrides if k not in fields]
    if unknown:
        close = difflib.get_close_matches(unknown[0], fields, n=1)
        hint = f"did you mean {close[0]}=?" if close else f"the options are {', '.join(fields)}"
        raise AugLocalError(f"{what}() got an unknown option {unknown[0]}=: {hint}")
    if base is None:
        config = cls()
    elif isinstance(base, cls):
        config = base
    elif isinstance(base, numbers.Integral) and not isinstance(base, bool):
        config = cls(blocks=base)
    else:
        raise AugLocalError(f"{what}(model, options): options={type(base).__name__} is not a {cls.__name__} "
                            "or a number of blocks; give e.g. PlanConfig(blocks=16), or 16")
    config = dataclasses.replace(config, **{fields[k].name: v for k, v in overrides.items()})
    validate(config)
    return normalised(config)


def normalised(config):
    """``config`` with NumPy / tensor integers as ints, reals as floats and sequences as lists, so
    it prints and writes to YAML as plain data (``np.int64(2)`` is a valid number of blocks)."""
    hints = typing.get_type_hints(type(config))
    return dataclasses.replace(config, **{f.name: _plain(hints[f.name], getattr(config, f.name))
                                          for f in options_of(type(config))})


def _plain(tp, value):
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and int in args:
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and float in args:
        return float(value)
    inner = next((typing.get_args(a)[0] for a in args if typing.get_origin(a) is list), None)
    if inner is not None and isinstance(value, list | tuple):
        return [_plain(inner, v) for v in value]
    return value


def validate(config) -> None:
    """Check every option of ``config``; the first wrong one raises ``AugLocalError.bad_value``."""
    hints = typing.get_type_hints(type(config))
    for f in options_of(type(config)):
        value = getattr(config, f.name)
        meta = f.metadata
        if meta["check"] is not None:
            meta["check"](value)
            continue
        if meta["choices"] is not None:
            names = meta["choices"]()
            if not isinstance(value, str) or value not in names:
                raise AugLocalError.bad_value(_keyword(f), value, f"is not {meta['kind']}; choose one of "
                                              f"{', '.join(names)}")
            continue
        if not _fits(hints[f.name], value, meta):
            raise AugLocalError.bad_value(_keyword(f), value, meta["problem"] or _wanted(hints[f.name], meta))


def _fits(tp, value, meta) -> bool:
    """Whether ``value`` has type ``tp`` (None where it is optional) and lies in the field's range."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_fits(a, value, meta) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int or tp is float:
        kind = numbers.Integral if tp is int else numbers.Real
        if not isinstance(value, kind) or isinstance(value, bool):
            return False
        return (meta.get("low") is None or value >= meta["low"]) and (meta["most"] is None or value <= meta["most"])
    if tp is str:
        return isinstance(value, str)
    if typing.get_origin(tp) is list:
        return isinstance(value, list | tuple) and all(_fits(args[0], v, meta) for v in value)
    return True


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "None"}


def _wanted(tp, meta) -> str:
    """What a value of the field's type and range is, for its error: "is not an integer >= 1"."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    words = " or ".join("a list of strings" if typing.get_origin(a) is list else _TYPE_WORDS.get(a, str(a))
                        for a in args)
    low = meta.get("low")
    return f"is not {words}" + (f" >= {low}" if low is not None else "")


# -- the command line ------------------------------------------------------------------------------
def cli_name(param: str) -> str:
    """How a flag spells an option: ``aux_depth`` -> ``--aux-depth``."""
    return "--" + param.replace("_", "-")


def recipe_name(param: str) -> str:
    """How an error about an option reads in a recipe: ``recipe key conversion.blocks =``."""
    return f"recipe key conversion.{param} ="


def add_arguments(parser: argparse.ArgumentParser, cls, defaults: dict | None = None) -> None:
    """One flag per option of ``cls`` with a ``cli`` entry: its type, choices, default and help
    from the field. The defaults are the field's (or ``defaults[name]``)."""
    hints = typing.get_type_hints(cls)
    for f in options_of(cls):
        cli = f.metadata["cli"]
        if cli is False:
            continue
        cli = dict(cli) if isinstance(cli, dict) else {}
        flags = [cli_name(f.name)] + ([cli.pop("short")] if "short" in cli else [])
        tp = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name])
        if typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        kwargs = {"dest": f.name, "type": tp, "help": f.metadata["help"]}
        if f.metadata["choices"] is not None:
            kwargs["choices"] = list(f.metadata["choices"]())
            entries = _registry(f.metadata["choices_from"])
            if isinstance(entries, dict) and all(hasattr(e, "summary") for e in entries.values()):
                kwargs["help"] += " (" + "; ".join(f"{k}: {e.summary}" for k, e in entries.items()) + ")"
        default = (defaults or {}).get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        if not cli.get("required"):
            kwargs["default"] = default
            if default is not None:
                kwargs["help"] += f" (default {default})"
        parser.add_argument(*flags, **{**kwargs, **cli})


def from_arguments(cls, args: argparse.Namespace, **extra):
    """The ``cls`` the parsed flags say (options without a flag keep their defaults), validated."""
    given = {f.name: getattr(args, f.name) for f in options_of(cls) if f.metadata["cli"] is not False}
    given = {k: list(v) if isinstance(v, tuple) else v for k, v in given.items()}
    config = dataclasses.replace(cls(), **given, **extra)
    validate(config)
    return normalised(config)


def word_options(text: str, names: Mapping[str, str]) -> str:
    """``text`` (a plan note) with each ``option=`` of ``names`` that starts a word written as the
    caller names it (``{"max_bundle": "--max-bundle"}``: ``max_bundle=1`` -> ``--max-bundle 1``)."""
    for key, name in names.items():
        out, start, token = [], 0, f"{key}="
        while (at := text.find(token, start)) >= 0:
            whole = at == 0 or not (text[at - 1].isalnum() or text[at - 1] in "_.-")
            out.append(text[start:at] + (f"{name} " if whole else token))
            start = at + len(token)
        text = "".join(out) + text[start:]
    return text
