"""Megatron-LM command-line flags -> `Config`.

The parser is generated from the dataclass fields in `config/` (each carries its flag name, help and
argparse options), so adding a setting there adds its flag here. Megatron-LM flags that pick between
implementations we do not have (kernel fusions, Transformer Engine, legacy vs mcore models) or that
tune logging we always do are accepted and named in one notice, so existing launch scripts run
unchanged; old spellings map to their settings; flags for features we lack are errors that say so.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence

from megatron_lite.config import SECTIONS, Config, ConfigError, field_default, field_flag

_ARGPARSE_KEYS = ("type", "choices", "action", "nargs")

_FUSION = "kernel fusion switches do not change results here"
# flag -> (number of values, why it has no effect)
IGNORED_FLAGS = {
    "--use-mcore-models": (0, "there is one model implementation"),
    "--use-legacy-models": (0, "there is one model implementation"),
    "--transformer-impl": (1, "local layers always (no Transformer Engine)"),
    "--no-bias-gelu-fusion": (0, _FUSION),
    "--no-bias-swiglu-fusion": (0, _FUSION),
    "--no-bias-dropout-fusion": (0, _FUSION),
    "--no-rope-fusion": (0, _FUSION),
    "--no-persist-layer-norm": (0, _FUSION),
    "--no-gradient-accumulation-fusion": (0, "weight gradients accumulate with torch ops"),
    "--no-async-tensor-model-parallel-allreduce": (0, "tp all-reduces are synchronous"),
    "--attention-softmax-in-fp32": (0, "every attention backend computes softmax in fp32"),
    "--log-throughput": (0, "tokens/s and TFLOP/s are always logged"),
    "--log-validation-ppl-to-tensorboard": (0, "validation perplexity is always logged"),
    "--log-memory-to-tensorboard": (0, "memory is reported in the log (--no-log-memory)"),
    "--log-world-size-to-tensorboard": (0, "the world size is in the startup log"),
    "--tensorboard-log-interval": (1, "TensorBoard scalars are written every --log-interval"),
}
# old or alternative Megatron spellings: flag -> (settings it stands for, as section.field: value)
ALIAS_FLAGS = {
    "--use-rotary-position-embeddings": {"model.position_embedding_type": "rope"},
    "--use-flash-attn": {"model.attention_backend": "sdpa"},
}
# flags with one accepted value: flag -> (value, the format we have)
FIXED_VALUE_FLAGS = {
    "--data-impl": ("mmap", "the .bin/.idx mmap format"),
}


def _add_compat_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "Megatron-LM compatibility", "accepted so existing launch scripts run; see README Flags"
    )
    for flag, (nargs, why) in IGNORED_FLAGS.items():
        kwargs = {"action": "store_true"} if nargs == 0 else {"metavar": "VALUE"}
        group.add_argument(flag, dest=f"compat.{flag}", default=None, help=why, **kwargs)
    for flag, settings in ALIAS_FLAGS.items():
        what = ", ".join(f"--{k.split('.')[1].replace('_', '-')} {v}" for k, v in settings.items())
        group.add_argument(flag, dest=f"compat.{flag}", action="store_true", help=f"= {what}")
    for flag, (value, what) in FIXED_VALUE_FLAGS.items():
        group.add_argument(flag, dest=f"compat.{flag}", choices=[value], help=f"{value}: {what}")
    group.add_argument(
        "--no-position-embedding",
        dest="compat.--no-position-embedding",
        action="store_true",
        help="no learned position embedding: needs --position-embedding-type rope",
    )


def _apply_compat(ns: argparse.Namespace) -> list[str]:
    """Move the compatibility flags out of `ns` into real settings; return the ignored ones."""
    given = {}
    for dest in [d for d in vars(ns) if d.startswith("compat.")]:
        value = getattr(ns, dest)
        delattr(ns, dest)
        if value not in (None, False):
            given[dest.split(".", 1)[1]] = value
    ignored = []
    for flag in given:
        if flag in ALIAS_FLAGS:
            for dest, setting in ALIAS_FLAGS[flag].items():
                setattr(ns, dest, setting)
        elif flag in IGNORED_FLAGS:
            ignored.append(flag)
    if given.get("--no-position-embedding") and ns.__dict__["model.position_embedding_type"] != (
        "rope"
    ):
        raise ConfigError(
            "--no-position-embedding without --position-embedding-type rope (no position "
            "information at all) is not supported"
        )
    return ignored


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        if (
            os.environ.get("LOCAL_RANK", "0") != "0"
        ):  # under a launcher: one copy, from local rank 0
            sys.exit(2)
        super().error(message)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description="megatron_lite: Megatron-style GPT pretraining (flags as in Megatron-LM).",
        allow_abbrev=False,
    )
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            kwargs = {k: f.metadata[k] for k in _ARGPARSE_KEYS if k in f.metadata}
            default = field_default(f)
            help_ = f.metadata["help"]
            if kwargs.get("action") not in ("store_true", "store_false"):
                help_ += f" (default: {default})"
            names = (field_flag(f), *f.metadata.get("aliases", ()))
            group.add_argument(
                *names, dest=f"{section}.{f.name}", default=default, help=help_, **kwargs
            )
    _add_compat_flags(parser)
    return parser


def config_from_namespace(ns: argparse.Namespace) -> Config:
    """The Config of parsed flags (raises ConfigError); notes the ignored Megatron-LM flags."""
    ignored = _apply_compat(ns)
    if ignored and os.environ.get("RANK", "0") == "0":
        notes = "; ".join(f"{f} ({IGNORED_FLAGS[f][1]})" for f in ignored)
        print(
            f"megatron_lite: these Megatron-LM flags have no effect here: {notes}", file=sys.stderr
        )
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
