"""Which tensors each rank sends and receives, and when, derived from every rank's action list.

Between two consecutive actions of a rank sits a *comm point*: one `batch_isend_irecv` holding the
output of the action just done (activation forward, or input gradient backward) and the receive the
next action needs. That is exactly Megatron's pairing (`send_forward_recv_backward` and friends),
derived instead of hand-written, so the same executor runs every schedule.

Messages between two ranks are matched in the order they are posted (NCCL ignores tags), so a
receiver posts its receives from a peer in the order that peer sends them, early if need be: with
pp = 2 and interleaving, activations and gradients share each direction and may arrive in another
order than they are used. `check_plan` replays the plan under rendezvous semantics (a transfer
completes only while both ranks are in the batch that holds it) and raises on a deadlock.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import NamedTuple

from megatron_lite.pipeline.actions import Action, build_actions, forward_only, num_chunks


class Message(NamedTuple):
    kind: str  # "act": a forward's output; "grad": a backward's input gradient
    microbatch: int
    stage: int  # the virtual stage that produced it


class CommOp(NamedTuple):
    op: str  # "send" or "recv"
    peer: int  # pipeline rank (index into the pp group)
    msg: Message


def virtual_stage(rank: int, chunk: int, p: int) -> int:
    return chunk * p + rank


def produces(a: Action, rank: int, p: int, v: int) -> CommOp | None:
    """The send an action's result needs, if any."""
    stage = virtual_stage(rank, a.chunk, p)
    if a.kind == "F" and stage < p * v - 1:
        return CommOp("send", (rank + 1) % p, Message("act", a.microbatch, stage))
    if a.kind == "B" and stage > 0:
        return CommOp("send", (rank - 1) % p, Message("grad", a.microbatch, stage))
    return None


def consumes(a: Action, rank: int, p: int, v: int) -> CommOp | None:
    """The receive an action's input needs, if any."""
    stage = virtual_stage(rank, a.chunk, p)
    if a.kind == "F" and stage > 0:
        return CommOp("recv", (rank - 1) % p, Message("act", a.microbatch, stage - 1))
    if a.kind == "B" and stage < p * v - 1:
        return CommOp("recv", (rank + 1) % p, Message("grad", a.microbatch, stage + 1))
    return None


Plan = tuple[
    tuple[tuple[CommOp, ...], ...], ...
]  # plan[rank][point] = ops; point k precedes action k


@functools.lru_cache(maxsize=64)
def build_plan(schedule: str, p: int, m: int, v: int = 1, fwd_only: bool = False) -> Plan:
    """Every rank's comm points for one step (one more point than actions: the last follows the end)."""
    actions = build_actions(schedule, p, m, v)
    if fwd_only:
        actions = tuple(forward_only(a) for a in actions)
    nv = num_chunks(schedule, v)
    points: list[list[list[CommOp]]] = [[[] for _ in range(len(a) + 1)] for a in actions]
    sent: dict[tuple[int, int], list[Message]] = defaultdict(list)  # (src, dst) -> in send order
    need: dict[Message, int] = {}  # message -> the receiver's point that needs it
    for r, acts in enumerate(actions):
        for k, a in enumerate(acts):
            out = produces(a, r, p, nv)
            if out is not None:
                points[r][k + 1].append(out)
                sent[(r, out.peer)].append(out.msg)
            inp = consumes(a, r, p, nv)
            if inp is not None:
                need[inp.msg] = k
    recv_at: dict[tuple[int, int], list[int]] = {}  # (src, dst) -> receiver's point, send order
    for (src, dst), msgs in sent.items():
        # FIFO matching: receive message j no later than any message sent after it is needed
        due, pts = len(points[dst]) - 1, []
        for msg in reversed(msgs):
            due = min(due, need[msg])
            pts.append(due)
        recv_at[(src, dst)] = pts[::-1]
    send_at = {
        chan: [k for k, ops in enumerate(points[chan[0]]) for o in ops if o.peer == chan[1]]
        for chan in sent
    }
    _replay([len(a) + 1 for a in actions], send_at, recv_at, repair=True)
    for (src, dst), msgs in sorted(sent.items()):
        for k, msg in zip(recv_at[(src, dst)], msgs):
            points[dst][k].append(CommOp("recv", src, msg))
    return tuple(tuple(tuple(ops) for ops in rank) for rank in points)


def check_plan(plan: Plan) -> None:
    """Raise if a plan mismatches messages or deadlocks when every transfer is a rendezvous (a
    transfer completes only while both ranks sit in the batch that holds it)."""
    chans: dict[tuple[str, int, int], list[tuple[int, Message]]] = defaultdict(list)
    for r, rank_points in enumerate(plan):
        for k, ops in enumerate(rank_points):
            for o in ops:
                src, dst = (r, o.peer) if o.op == "send" else (o.peer, r)
                chans[(o.op, src, dst)].append((k, o.msg))
    send_at, recv_at = {}, {}
    for (op, src, dst), posted in chans.items():
        sent = [m for _, m in chans.get(("send", src, dst), [])]
        got = [m for _, m in chans.get(("recv", src, dst), [])]
        if sent != got:
            raise ValueError(f"rank {src} -> {dst}: sends {sent} but receives {got}")
        (send_at if op == "send" else recv_at)[(src, dst)] = [k for k, _ in posted]
    _replay([len(r) for r in plan], send_at, recv_at, repair=False)


def _replay(n_points: list[int], send_at: dict, recv_at: dict, repair: bool) -> None:
    """Run comm points under rendezvous semantics; messages of a channel (src, dst) match in order.
    With `repair`, a deadlock is resolved by posting the receive a blocked send waits for at the
    receiver's current (earlier) point, editing `recv_at`; else it raises."""
    p = len(n_points)
    left = [[0] * n for n in n_points]  # transfers still open at each point
    for (src, dst), pts in send_at.items():
        for k in pts:
            left[src][k] += 1
        for k in recv_at[(src, dst)]:
            left[dst][k] += 1
    matched = dict.fromkeys(send_at, 0)
    pos = [0] * p
    while True:
        progress = False
        for r in range(p):
            while pos[r] < n_points[r] and left[r][pos[r]] == 0:
                pos[r] += 1
                progress = True
        for (src, dst), j in matched.items():
            sends, recvs = send_at[(src, dst)], recv_at[(src, dst)]
            while j < len(sends) and sends[j] == pos[src] and recvs[j] == pos[dst]:
                left[src][pos[src]] -= 1
                left[dst][pos[dst]] -= 1
                j += 1
                progress = True
            matched[(src, dst)] = j
        if all(pos[r] == n_points[r] for r in range(p)):
            return
        if progress:
            continue
        late = [
            c
            for c, j in matched.items()
            if j < len(send_at[c]) and send_at[c][j] == pos[c[0]] and recv_at[c][j] > pos[c[1]]
        ]
        if not repair or not late:
            raise ValueError(f"deadlock: ranks stuck at comm points {pos}")
        src, dst = late[0]
        j = matched[late[0]]
        left[dst][recv_at[late[0]][j]] -= 1
        recv_at[late[0]][j] = pos[dst]
        left[dst][pos[dst]] += 1
