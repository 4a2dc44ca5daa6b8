"""Optimizer state per parameter name, for checkpoints: the same structure with or without ZeRO-1.

`per_param_state_dict()` -> {name: {"exp_avg": T, "exp_avg_sq": T, "master": T}} (SGD:
"momentum_buffer"; "master" only under mixed precision), each tensor shaped like this rank's
(tp-sharded) parameter. The distributed optimizer all-gathers its dp shards for it (a collective over
dp), one bucket at a time. `load_per_param_state_dict(d)` keeps the slice this rank's pieces need, so a
state saved under any dp layout loads into any other.

`sharded_state_dict()` is the collective-free alternative: this rank's flat slices plus where each sits
in its parameter (name -> shape, start, end); `merge_sharded_state_dicts` turns the shards of all dp
ranks back into the per-parameter form.
"""

from __future__ import annotations

import torch

from megatron_lite import comm


def _state_keys(optimizer_name: str) -> tuple[str, ...]:
    return ("momentum_buffer",) if optimizer_name == "sgd" else ("exp_avg", "exp_avg_sq")


class PerParamState:
    """Mixin for MegatronOptimizer (uses self.pieces, self.inner, self.cfg, self.ps, ...)."""

    def _keys(self) -> tuple[str, ...]:
        keys = _state_keys(self.cfg.optimizer)
        return keys + ("master",) if self.mixed_precision else keys

    def _value(self, pc, key: str) -> torch.Tensor:
        """The fp32 flat state `key` of piece `pc` (zeros before the first step)."""
        if key == "master":
            return pc.master
        t = self.inner.state.get(pc.master, {}).get(key)
        return torch.zeros_like(pc.master, dtype=torch.float32) if t is None else t

    @torch.no_grad()
    def per_param_state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every parameter's full state on this rank's tp/pp shard (collective over dp if ZeRO-1)."""
        if not self.distributed:
            return {
                pc.name: {k: self._value(pc, k).view(pc.param.shape).clone() for k in self._keys()}
                for pc in self.pieces
            }
        out: dict[str, dict[str, torch.Tensor]] = {}
        by_bucket: dict[int, list] = {}
        for pc in self.pieces:
            by_bucket.setdefault(id(pc.bucket), []).append(pc)
        for chunk in self.chunks:  # same bucket order on every dp rank
            for buf in chunk.buffers:
                for b in buf.buckets:
                    self._gather_bucket(buf, b, by_bucket.get(id(b), []), out)
        return out

    def _gather_bucket(self, buf, bucket, pieces, out) -> None:
        s0, s1 = bucket.shard_range(buf.rank, buf.dp_size)
        device = buf.grad_data.device
        for key in self._keys():
            local = torch.zeros(s1 - s0, dtype=torch.float32, device=device)
            for pc in pieces:
                at = buf.ranges[id(pc.param)][0] + pc.start - s0
                local[at : at + pc.end - pc.start] = self._value(pc, key)
            full = torch.empty(bucket.numel, dtype=torch.float32, device=device)
            if buf.dp_size > 1:
                comm.all_gather(full, local, buf.group)
            else:
                full.copy_(local)
            for p in bucket.params:
                ps, pe = buf.ranges[id(p)]
                name = self.names[id(p)]
                out.setdefault(name, {})[key] = (
                    full[ps - bucket.offset : pe - bucket.offset].view(p.shape).clone()
                )

    @torch.no_grad()
    def load_per_param_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Load the per-parameter form (from any dp layout); masters absent -> taken from the model."""
        keys = _state_keys(self.cfg.optimizer)
        for pc in self.pieces:
            if pc.name not in state:
                raise KeyError(f"optimizer state has no entry for parameter {pc.name!r}")
            entry = state[pc.name]
            for key in keys + ("master",):
                if key not in entry:
                    continue
                t = entry[key]
                if t.numel() != pc.param.numel():
                    raise ValueError(
                        f"optimizer state {key} of {pc.name!r} has shape {tuple(t.shape)}, the "
                        f"parameter {tuple(pc.param.shape)}"
                    )
                flat = t.reshape(-1)[pc.start : pc.end].to(pc.master.device, torch.float32)
                if key == "master":
                    if pc.master is not pc.model:
                        pc.master.copy_(flat)
                else:
                    self.inner.state[pc.master][key] = flat.clone()
            if self.mixed_precision and "master" not in entry and pc.master is not pc.model:
                pc.master.copy_(pc.model)
        self._set_step_counts()

    def _set_step_counts(self) -> None:
        """torch's Adam keeps a step per parameter; they all equal our successful step count."""
        if self.cfg.optimizer == "sgd":
            return
        for pc in self.pieces:
            st = self.inner.state.get(pc.master)
            if st:
                st["step"] = torch.tensor(float(self.num_steps), dtype=torch.float32)

    @torch.no_grad()
    def sharded_state_dict(self) -> dict:
        """This rank's pieces only, with where each lies in its parameter (no communication)."""
        return {
            "dp_rank": self.ps.dp_rank,
            "dp_size": self.ps.dp_size if self.distributed else 1,
            "state": {
                pc.name: {k: self._value(pc, k).clone() for k in self._keys()} for pc in self.pieces
            },
            "ranges": {
                pc.name: {"shape": list(pc.param.shape), "start": pc.start, "end": pc.end}
                for pc in self.pieces
            },
        }

    def optimizer_state_bytes(self) -> int:
        """Bytes this rank holds for optimizer state: moments plus fp32 masters (when separate)."""
        n = sum(
            t.numel() * t.element_size()
            for st in self.inner.state.values()
            for t in st.values()
            if isinstance(t, torch.Tensor) and t.dim() > 0
        )
        return n + sum(
            pc.master.numel() * pc.master.element_size()
            for pc in self.pieces
            if pc.master is not pc.model
        )


def merge_sharded_state_dicts(shards: list[dict]) -> dict[str, dict[str, torch.Tensor]]:
    """The per-parameter form from the `sharded_state_dict()` of every dp rank of one (tp, pp) rank."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for sd in shards:
        for name, rng in sd["ranges"].items():
            shape = torch.Size(rng["shape"])
            for key, t in sd["state"][name].items():
                full = out.setdefault(name, {}).setdefault(key, torch.zeros(shape))
                full.view(-1)[rng["start"] : rng["end"]] = t
    return out
