"""Megatron-LM command-line flags -> `Config`.

The parser is generated from the dataclass fields in `config.py` (each carries its flag name, help and
argparse options), so adding a setting there adds its flag here.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

from megatron_lite.config import SECTIONS, Config, ConfigError

_ARGPARSE_KEYS = ("type", "choices", "action", "nargs")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="megatron_lite: Megatron-style GPT pretraining (flags as in Megatron-LM).",
        allow_abbrev=False,
    )
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            kwargs = {k: f.metadata[k] for k in _ARGPARSE_KEYS if k in f.metadata}
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_ = f.metadata["help"]
            if kwargs.get("action") not in ("store_true", "store_false"):
                help_ += f" (default: {default})"
            group.add_argument(
                flag, dest=f"{section}.{f.name}", default=default, help=help_, **kwargs
            )
    return parser


def config_from_namespace(ns: argparse.Namespace) -> Config:
    values: dict[str, dict] = {s: {} for s in SECTIONS}
    for dest, v in vars(ns).items():
        section, name = dest.split(".", 1)
        values[section][name] = v
    sections = {s: SECTIONS[s](**values[s]) for s in SECTIONS}
    return Config(**sections)


def parse_args(argv: Sequence[str] | None = None, prog: str | None = None) -> Config:
    """Parse Megatron-style flags; an inconsistent setting exits with a message naming the flags."""
    parser = build_parser(prog)
    ns = parser.parse_args(argv)
    try:
        return config_from_namespace(ns)
    except ConfigError as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits
