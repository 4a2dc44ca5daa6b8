"""The one place the tests build run configs: flat field names, the tiny sizes, NullTokenizer ids.

    cfg = tiny_config(num_layers=4, vocab_size=100, tp=2, world=4)

Every keyword is a field of one of `Config`'s sections (`hidden_size` goes to `model`,
`use_distributed_optimizer` to `parallel`, `seed` to `train`...: field names are unique across
sections), a short layout name (`tp`, `pp`, `cp`, `ep`, `sp`, `vl`), or a whole section object
(`data=DataConfig(...)`). `vocab_size` without `tokenizer_type` means a NullTokenizer of that size;
`world` finalizes the config for that many ranks. `make_config` starts from the library's defaults,
`tiny_config` from `TINY` (a 2-layer, 32-wide GPT on 16 tokens); `NO_DROPOUT` switches dropout off
where a test compares losses.

Processes: in-process ranks come from `megatron_lite.distributed.testing.run_distributed` (forked,
one call per group of ranks), the real entry point under torchrun from `launch_util.run_pretrain`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron_lite.config import SECTIONS, Config

TINY = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16}
NO_DROPOUT = {"hidden_dropout": 0.0, "attention_dropout": 0.0}
LAYOUT = {
    "tp": "tensor_model_parallel_size",
    "pp": "pipeline_model_parallel_size",
    "cp": "context_parallel_size",
    "ep": "expert_model_parallel_size",
    "sp": "sequence_parallel",
    "vl": "num_layers_per_virtual_pipeline_stage",
}
SECTION_OF = {f.name: s for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


def make_config(world: int | None = None, **fields: Any) -> Config:
    """A `Config` from flat field names over the library defaults (finalized for `world` ranks)."""
    sections: dict[str, Any] = {s: fields.pop(s) for s in list(fields) if s in SECTIONS}
    flat: dict[str, dict[str, Any]] = {}
    for name, value in fields.items():
        name = LAYOUT.get(name, name)
        if name not in SECTION_OF:
            raise TypeError(f"make_config: {name!r} is no field of any Config section")
        flat.setdefault(SECTION_OF[name], {})[name] = value
    data = flat.get("data", {})
    if "vocab_size" in data and "tokenizer_type" not in data and "data" not in sections:
        data["tokenizer_type"] = "NullTokenizer"
    for s, values in flat.items():
        given = sections.get(s)
        sections[s] = dataclasses.replace(given, **values) if given else SECTIONS[s](**values)
    cfg = Config(**sections)
    return cfg if world is None else cfg.finalize(world)


def tiny_config(world: int | None = None, **fields: Any) -> Config:
    """`make_config` over the tiny sizes `TINY` (any of them overridden by `fields`)."""
    return make_config(world, **{**TINY, **fields})
