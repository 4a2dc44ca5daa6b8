"""Context parallelism: each rank of a cp group holds 1/cp of every sequence; attention runs as ring
attention (Liu et al. 2023, "Ring Attention with Blockwise Transformers"), the K/V blocks passed
around the ring while the local block computes, partial results merged by their log-sum-exp.

Causal load balancing as Megatron's: the sequence is cut into 2cp chunks and cp rank i holds chunks
i and 2cp-1-i, so every rank does the same work. Seen from rank i, the block of rank j is

    j == i: causal over the local 2 chunks (they keep the global order)
    j <  i: every local query sees the first chunk of j's block (chunk j), none of chunk 2cp-1-j
    j >  i: only the second local chunk (2cp-1-i) sees j's block, all of it

so no block is ever fully masked and each step is one or half a dense block.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_lite import comm


def cp_chunk_positions(seq_length: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """Global positions of the tokens cp rank `cp_rank` holds: chunks cp_rank and 2cp-1-cp_rank."""
    c = seq_length // (2 * cp_size)
    first = torch.arange(cp_rank * c, (cp_rank + 1) * c)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * c, (2 * cp_size - cp_rank) * c)
    return torch.cat([first, second])


def slice_for_cp(t: torch.Tensor, dim: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """This rank's two chunks of `t` along its sequence dimension `dim` (contiguous copy)."""
    if cp_size == 1:
        return t
    idx = cp_chunk_positions(t.shape[dim], cp_rank, cp_size).to(t.device)
    return t.index_select(dim, idx)


class CPBatchSlicer:
    """A re-iterable view of a microbatch loader giving this cp rank its chunks of each sample
    (every cp rank of a group reads the same samples: they share the dp rank)."""

    KEYS = ("tokens", "labels", "loss_mask", "position_ids")

    def __init__(self, loader, cp_rank: int, cp_size: int):
        self.loader, self.cp_rank, self.cp_size = loader, cp_rank, cp_size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield {
                k: slice_for_cp(v, 1, self.cp_rank, self.cp_size) if k in self.KEYS else v
                for k, v in batch.items()
            }


# --- one block: plain torch ops that also return the log-sum-exp ----------------------------------
def _expand(kv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[b, ng, s, d] -> [b, np, s, d] (grouped-query attention: each kv head serves np/ng heads)."""
    ng = kv.shape[1]
    return kv if ng == num_heads else kv.repeat_interleave(num_heads // ng, dim=1)


def _fold(dkv: torch.Tensor, ng: int) -> torch.Tensor:
    """The gradient of `_expand`: [b, np, s, d] -> [b, ng, s, d], summing each group's heads."""
    b, np_, s, d = dkv.shape
    return dkv if ng == np_ else dkv.view(b, ng, np_ // ng, s, d).sum(2)


def _scores(q, k, scale: float, causal: bool) -> torch.Tensor:
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # [b, np, sq, sk], fp32
    if causal:
        sq, sk = s.shape[-2:]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=s.device).triu_(1)
        s = s.masked_fill(mask, float("-inf"))
    return s


def block_forward(q, k, v, scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T scale) v of one block in fp32, and its log-sum-exp [b, np, sq]."""
    np_ = q.shape[1]
    s = _scores(q.float(), _expand(k, np_).float(), scale, causal)
    lse = torch.logsumexp(s, dim=-1)
    out = torch.matmul(torch.exp(s - lse[..., None]), _expand(v, np_).float())
    return out, lse


def block_backward(q, k, v, dout, lse, delta, scale: float, causal: bool):
    """(dq, dk, dv) of one block given the final lse and delta = rowsum(dout * out) (the softmax
    backward of the whole row, as FlashAttention's)."""
    np_, ng = q.shape[1], k.shape[1]
    qf, kf, vf = q.float(), _expand(k, np_).float(), _expand(v, np_).float()
    p = torch.exp(_scores(qf, kf, scale, causal) - lse[..., None])
    dv = torch.matmul(p.transpose(-1, -2), dout)
    ds = p * (torch.matmul(dout, vf.transpose(-1, -2)) - delta[..., None])
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qf) * scale
    return dq, _fold(dk, ng), _fold(dv, ng)


def _merge(out, lse, rows: slice, o_blk, lse_blk) -> None:
    """Fold one block's (out, lse) into the running result for query rows `rows` (in place)."""
    old = lse[..., rows]
    new = torch.logaddexp(old, lse_blk)
    out[..., rows, :] = (
        out[..., rows, :] * torch.exp(old - new)[..., None]
        + o_blk * torch.exp(lse_blk - new)[..., None]
    )
    lse[..., rows] = new


def _block_plan(step: int, cp_rank: int, cp_size: int, c: int) -> tuple[slice, slice, bool]:
    """(query rows, key columns, causal) of ring step `step`: the block of rank cp_rank - step."""
    src = (cp_rank - step) % cp_size
    if step == 0:
        return slice(None), slice(None), True
    if src < cp_rank:
        return slice(None), slice(0, c), False
    return slice(c, None), slice(None), False


# --- the ring ---------------------------------------------------------------------------------------
class _Ring:
    """This rank's place in its cp group: the neighbours K/V blocks come from and go to."""

    def __init__(self, group: comm.Group, overlap: bool = True):
        """`overlap=False` waits for each exchange before computing (the benchmark's baseline)."""
        ranks = dist.get_process_group_ranks(group) if comm.group_size(group) > 1 else [0]
        self.group, self.size, self.overlap = group, len(ranks), overlap
        self.rank = ranks.index(dist.get_rank()) if self.size > 1 else 0
        self.next = ranks[(self.rank + 1) % self.size]
        self.prev = ranks[(self.rank - 1) % self.size]

    def start(self, tensor: torch.Tensor, last: bool = False):
        """Send `tensor` on to the next rank, receive the previous rank's like (unless this is the
        `last` step or the ring is one rank); -> (what will arrive, or None; works to wait on)."""
        if last or self.size == 1:
            return None, []
        (received,), works = comm.ring_exchange([tensor], self.next, self.prev, self.group)
        if not self.overlap:  # (a gloo send's work must be waited on once only)
            comm.wait_all(works)
            works = []
        return received, works


class RingAttention(torch.autograd.Function):
    """Causal attention over the whole sequence from this rank's load-balanced chunks.
    q [b, np, 2c, d], k/v [b, ng, 2c, d] -> [b, np, 2c, d]."""

    @staticmethod
    def forward(ctx, q, k, v, group, scale: float, overlap: bool = True):
        ring = _Ring(group, overlap)
        c = q.shape[2] // 2
        kv = torch.stack([k, v]).contiguous()
        out = lse = None
        for step in range(ring.size):
            # the next block travels while this one computes
            nxt, works = ring.start(kv, last=step + 1 == ring.size)
            rows, cols, causal = _block_plan(step, ring.rank, ring.size, c)
            k_blk, v_blk = kv[0][:, :, cols], kv[1][:, :, cols]
            o_blk, lse_blk = block_forward(q[:, :, rows], k_blk, v_blk, scale, causal)
            if out is None:
                out, lse = o_blk, lse_blk
            else:
                _merge(out, lse, rows, o_blk, lse_blk)
            comm.wait_all(works)
            kv = kv if nxt is None else nxt
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.scale, ctx.overlap = group, scale, overlap
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        ring, scale = _Ring(ctx.group, ctx.overlap), ctx.scale
        c = q.shape[2] // 2
        dout = dout.float()
        delta = (dout * out).sum(-1)  # [b, np, 2c]
        dq = torch.zeros_like(q, dtype=torch.float32)
        kv = torch.stack([k, v]).contiguous()
        in_flight = None, []  # the dK/dV exchange started after the previous block
        for step in range(ring.size):
            # K/V of the next block travel during this block's compute
            nxt, works = ring.start(kv, last=step + 1 == ring.size)
            rows, cols, causal = _block_plan(step, ring.rank, ring.size, c)
            dq_blk, dk_blk, dv_blk = block_backward(
                q[:, :, rows],
                kv[0][:, :, cols],
                kv[1][:, :, cols],
                dout[:, :, rows],
                lse[..., rows],
                delta[..., rows],
                scale,
                causal,
            )
            dq[:, :, rows] += dq_blk
            dkv = torch.zeros_like(kv, dtype=torch.float32)
            dkv[0][:, :, cols] = dk_blk
            dkv[1][:, :, cols] = dv_blk
            # the other ranks' dK/dV of this block so far, sent on while this block computed;
            # summed in, they follow the block round the ring, back to its owner after cp hops
            arrived, dworks = in_flight
            comm.wait_all(dworks)
            if arrived is not None:
                dkv += arrived
            in_flight = ring.start(dkv)
            comm.wait_all(works)
            kv = kv if nxt is None else nxt
        arrived, dworks = in_flight
        comm.wait_all(dworks)
        dkv = dkv if arrived is None else arrived
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


def ring_attention(q, k, v, group: comm.Group, scale: float, overlap: bool = True) -> torch.Tensor:
    """Causal attention of this cp rank's queries against the whole sequence (see the module doc);
    one rank (`group` None or of size 1): plain block attention. `overlap=False` sends, waits,
    then computes (the benchmark's comm-then-compute baseline)."""
    return RingAttention.apply(q, k, v, group, scale, overlap)
