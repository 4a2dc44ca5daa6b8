"""The `flag()` field helper, the flag spelling of a field, and the error every check raises.

A config field declared with `flag(...)` carries its Megatron-LM flag name (default --field-name)
and argparse options in its metadata: `arguments.py` builds the parser from them and the HF importer
prints a command line from them, so each setting is declared once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

from megatron_lite.errors import UserError


class ConfigError(UserError, ValueError):
    """An inconsistent or invalid setting; the message names the flag(s) and value(s)."""


def flag(default: Any, help: str, *, name: str | None = None, **argparse_kwargs: Any) -> Any:
    """A dataclass field that is also a command-line flag (`name` defaults to --field-name)."""
    if isinstance(default, list):
        return field(
            default_factory=lambda: list(default),
            metadata={"help": help, "flag": name, **argparse_kwargs},
        )
    return field(default=default, metadata={"help": help, "flag": name, **argparse_kwargs})


def field_flag(f: dataclasses.Field) -> str:
    """The flag of a config field: its declared `name`, else --field-name."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def field_default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def flag_name(cls: type, field_name: str) -> str:
    """The flag of field `field_name` of config class `cls` (the name itself if it has none)."""
    for f in dataclasses.fields(cls):
        if f.name == field_name:
            return field_flag(f)
    return field_name


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def positive(obj: Any, *names: str) -> None:
    """Each named field of `obj` that is set must be > 0."""
    for n in names:
        v = getattr(obj, n)
        if v is not None:
            require(v > 0, f"{flag_name(type(obj), n)} must be positive, got {v}")


def _flag_words(f: dataclasses.Field, value: Any) -> list[str]:
    if f.metadata.get("action") in ("store_true", "store_false"):
        return [field_flag(f)]  # it differs from its default: the bare flag says so
    values = value if isinstance(value, list) else [value]
    if f.metadata.get("join"):  # one word of joined values: --window-size 4096,0
        return [field_flag(f), f.metadata["join"].join(str(v) for v in values)]
    return [field_flag(f), *(str(v) for v in values)]


def command_line(section: Any) -> list[str]:
    """The flags (as argv words) that rebuild config section `section`: every field that differs
    from its default, in its flag's spelling, less those the others derive (--ffn-hidden-size
    4 x hidden, --max-position-embeddings = --seq-length, ...)."""
    cls = type(section)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    given = {
        n: getattr(section, n) for n, f in fields.items() if getattr(section, n) != field_default(f)
    }
    for name in list(given):
        rest = {k: v for k, v in given.items() if k != name}
        try:
            if cls(**rest) == section:
                given = rest
        except ConfigError:
            pass  # needed: without it the others are inconsistent
    return [w for name, v in given.items() for w in _flag_words(fields[name], v)]
