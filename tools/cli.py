"""
Command-line flags read from a settings dataclass, so defaults and help live in one place.

Every field of a settings dataclass (decode.DecodeConfig, train.TrainConfig, ...) carries its
meaning for a user: in `field(metadata={"help": ...})`, or in the comment after it. `field_help`
reads them, and `add_dataclass_flags` turns each field into an argparse flag with that help, the
dataclass's default (or a script's own) and a parser for the field's type. A field added to the
dataclass is a flag at once, with no hand wiring.

    ap = argparse.ArgumentParser()
    add_dataclass_flags(ap, DecodeConfig, skip={"mask_id"}, defaults={"cache": "dual"})
    config = DecodeConfig(**{name: getattr(args, name) for name in flag_names(DecodeConfig, skip)})

With `given_only=True` a flag the user leaves out is absent from the parsed namespace, so a script
can tell a typed value from a default (run.py replaces its default commit rule only when another
rule is typed); `defaults` then only say, in the help, what an absent flag means.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import io
import math
import re
import tokenize


@functools.lru_cache(maxsize=None)
def field_help(cls) -> dict[str, str]:
    """{field name: its help}: the field's metadata["help"] where it has one, else the comment that
    follows it, continuation lines ('#   ...') joined on."""
    metadata = {f.name: f.metadata["help"] for f in dataclasses.fields(cls) if "help" in f.metadata}
    source = inspect.getsource(cls)
    lines = {tok.start[0]: tok.string.lstrip("#").strip()  # comments by line number: a '#' in a string is not one
             for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    names, out, current = {f.name for f in dataclasses.fields(cls)}, {}, None
    source = source.splitlines()
    for number, line in enumerate(source, start=1):
        match = re.match(r"\s*(\w+)\s*:", line)
        if match and match[1] in names and number in lines:
            current = match[1]
            out[current] = lines[number]
        elif current and number in lines and line.strip().startswith("#"):
            out[current] += " " + lines[number]
        else:
            current = None
    return {**out, **metadata}


def none_or(kind):
    """A parser for an optional setting: 'none' (or 'off') is None, anything else `kind`."""
    def parse(text: str):
        if text.strip().lower() in ("none", "off"):
            return None
        return kind(text)
    parse.__name__ = kind.__name__
    return parse


def finite_float(text: str) -> float:
    """A float flag; nan is refused here, since it compares false with everything."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if math.isnan(value):
        raise argparse.ArgumentTypeError("nan is not a valid value")
    return value


def add_dataclass_flags(ap: argparse.ArgumentParser, cls, skip=(), defaults=None, kinds=None,
                        given_only=False) -> None:
    """One flag per field of `cls` not in `skip`: --field-name, help from field_help, default
    from `defaults` or the dataclass. bool fields are --x/--no-x; `kinds` maps a field name to
    its own parser where the type alone does not say (e.g. a choice). With given_only, a flag
    left out is absent from the namespace and `defaults` is only what the help shows."""
    defaults, kinds = defaults or {}, kinds or {}
    helps, hints = field_help(cls), typing_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        shown = defaults.get(f.name, f.default)
        default = argparse.SUPPRESS if given_only else shown
        flag = "--" + f.name.replace("_", "-")
        text = helps.get(f.name, "").replace("%", "%%")  # argparse formats help with %
        hint = hints[f.name]
        if f.name not in kinds and hint in ("bool", "bool | Quirks"):
            # BooleanOptionalAction adds "(default: ...)" itself, except for a suppressed default
            text += f" (default: {shown})" if given_only else ""
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
            continue
        kind = kinds.get(f.name) or {"int": int, "float": finite_float, "str": str, "float | None": none_or(finite_float),
                                     "int | None": none_or(int), "str | None": none_or(str)}.get(hint)
        if kind is None:
            raise TypeError(f"{cls.__name__}.{f.name}: no flag parser for type {hint!r}; pass one in kinds")
        shown = str(shown).replace("%", "%%")
        ap.add_argument(flag, type=kind, default=default, help=f"{text} (default: {shown})")


def typing_hints(cls) -> dict[str, str]:
    """{field: its annotation as written} (the modules use `from __future__ import annotations`)."""
    return {f.name: f.type if isinstance(f.type, str) else f.type.__name__ for f in dataclasses.fields(cls)}


def flag_names(cls, skip=()) -> list[str]:
    """The fields `add_dataclass_flags` made flags of."""
    return [f.name for f in dataclasses.fields(cls) if f.name not in skip]
