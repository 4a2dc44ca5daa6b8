"""Continuous batching: requests join a running batch between decode steps and leave when done.

    engine = Engine(lm, max_batch_size=8)          # on the serving rank; the others run follow()
    engine.start()                                 # the scheduler's thread
    req = engine.submit(Request(prompt_ids, 32, SamplingParams(temperature=0), eod=tok.eod))
    for token in req.stream(): ...                 # or req.result() -> GenerationOutput
    engine.stop()

The engine keeps up to `max_batch_size` sequences in a `SlotKVCache`, each row at its own length.
Each round it admits waiting requests into free rows (one prefill step for all the newcomers:
their prompts through the model, right-padded to the longest, which samples each one's first
token), then runs one decode step of every active row together (one token each). A sequence leaves after its end-of-document token, a stop condition or
`max_new_tokens`, and its row takes the next newcomer. Each sequence draws from its own generator
seeded by its request, so it gets the tokens one `generate` call would give.

This is the only decode loop: `generate`, `generate_batch` (generation.py), evaluation's
generate-until and RL rollouts submit their requests and run them to the end (`Engine.run`), with
every rank of the replica scheduling alike (`lockstep`: no plan broadcast, no follower loop).

Over tp x pp every rank of the model replica runs every step: the serving rank decides the step
(a small JSON plan: which rows, which tokens) and broadcasts it; the last stage samples and
broadcasts the tokens back. The followers keep the same rows and generators because they apply
the same plans. `lm` everywhere here is a loaded `generation.LanguageModel` (its `logits`, `ps`,
`max_length`, `vocab_size`, `cache_margin`).
"""

from __future__ import annotations

import json
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from megatron_lite import comm, device
from megatron_lite.inference.kv_cache import SlotKVCache
from megatron_lite.inference.sampling import GenerationOutput, SamplingParams, sample
from megatron_lite.inference.validation import check_prompt

_DONE = object()  # the end of a request's token stream
FAILED = -1  # the token of a row whose step failed
DEFAULT_MAX_REQUESTS = 8  # Megatron's --inference-max-requests default: rows of the batch


@dataclass
class Request:
    """One sequence to extend. `stop(new_tokens)` (stop strings, extra stop ids) runs on the
    serving rank only (every rank in lockstep). Read the answer with `stream()` (tokens as they
    come) or `result()`. `use_cache` False: each step reruns the whole sequence (same tokens,
    slower); `return_logits`: the result holds each step's logits (on the last stage)."""

    prompt: list[int]
    max_new_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    eod: int | None = None
    stop: Callable[[list[int]], bool] | None = None
    use_cache: bool = True
    return_logits: bool = False
    tokens: list[int] = field(default_factory=list)
    step_logits: list[torch.Tensor] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False  # set by `cancel()`: the client went away
    error: BaseException | None = None
    _events: queue.Queue = field(default_factory=queue.Queue, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    def _push(self, token: int) -> None:
        self.tokens.append(token)
        self._events.put(token)

    def _finish(self, reason: str | None, error: BaseException | None = None) -> None:
        self.finish_reason, self.error = reason, error
        self._done.set()
        self._events.put(_DONE)

    def cancel(self) -> None:
        """Stop after the next step (finish_reason "cancelled"): its row goes to the next one."""
        self.cancelled = True

    def stream(self) -> Iterator[int]:
        """The new tokens as the engine samples them; raises the engine's error if it failed."""
        while (t := self._events.get()) is not _DONE:
            yield t
        if self.error is not None:
            raise RuntimeError(f"generation failed: {self.error}") from self.error

    def result(self, timeout: float | None = None) -> GenerationOutput:
        if not self._done.wait(timeout):
            raise TimeoutError(f"no answer within {timeout} s")
        if self.error is not None:
            raise RuntimeError(f"generation failed: {self.error}") from self.error
        logits = list(self.step_logits) if self.return_logits else None
        return GenerationOutput(list(self.tokens), self.finish_reason or "length", logits)


def broadcast_token(t: torch.Tensor | None, ps, batch: int = 1) -> torch.Tensor:
    """The tokens [batch] sampled on the last stage's tp rank 0, on every rank of the model (each
    rank must extend the same text); other ranks pass None."""
    if ps.tp_size * ps.pp_size == 1:
        return t
    dev = device.comm_device(ps.backend)
    buf = t.to(dev) if t is not None else torch.zeros(batch, dtype=torch.long, device=dev)
    comm.broadcast(buf, ps.mp_ranks[(ps.pp_size - 1) * ps.tp_size], ps.mp_group)
    return buf.cpu()


def broadcast_json(obj, lm):
    """The serving rank's `obj` (JSON-able; None = stop) on every rank of the model replica, as
    UTF-8 bytes (no pickling). The other ranks pass None."""
    ps = lm.ps
    if ps.tp_size * ps.pp_size == 1:
        return obj
    src, serving = ps.mp_ranks[0], ps.rank == ps.mp_ranks[0]
    dev = device.comm_device(ps.backend)  # NCCL broadcasts only GPU tensors
    data = json.dumps(obj).encode() if serving else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    comm.broadcast(size, src, ps.mp_group)
    buf = torch.zeros(int(size), dtype=torch.uint8, device=dev)
    if serving:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    comm.broadcast(buf, src, ps.mp_group)
    return json.loads(buf.cpu().numpy().tobytes().decode())


class EngineCore:
    """What every rank of the replica holds: the KV cache and each row's sampling state; `step`
    runs one plan and returns the sampled token of each of its rows. `max_sequence_length`: the
    cache's tokens per row (default: the model's positions)."""

    def __init__(self, lm, max_batch_size: int, max_sequence_length: int | None = None):
        if max_batch_size < 1:
            raise ValueError(f"--inference-max-requests must be >= 1, got {max_batch_size}")
        self.lm = lm
        length = min(max_sequence_length or lm.max_length, lm.max_length)
        self.cache = SlotKVCache(max_batch_size, length + lm.cache_margin)
        self.params: list[SamplingParams | None] = [None] * max_batch_size
        self.generators: list[torch.Generator | None] = [None] * max_batch_size
        self.logits: torch.Tensor | None = None  # the last step's [rows, vocab] (last stage)

    @torch.no_grad()
    def step(self, plan: dict) -> list[int]:
        """plan {"prefill": rows, "tokens": prompts, "sampling": [[t, k, p], ...], "seeds": [...]}
        starts a sequence in each row (without "sampling" and "seeds": reruns each row's whole
        sequence, its sampling state kept: decoding without the cache); {"decode": rows,
        "tokens": last token of each} extends them by one. Prompts of one prefill are
        right-padded to the longest: each row's padding lies past its own last token, where its
        causal mask does not look, and the next step overwrites it (the row advances by its own
        prompt only)."""
        if "prefill" in plan:
            rows, prompts = plan["prefill"], plan["tokens"]
            for row in rows:
                self.cache.reset(row)
            for row, sampling, seed in zip(rows, plan.get("sampling", ()), plan.get("seeds", ())):
                self.params[row] = SamplingParams(*sampling)
                self.generators[row] = torch.Generator().manual_seed(seed)
        else:
            rows, prompts = plan["decode"], [[t] for t in plan["tokens"]]
        lengths = torch.tensor([len(p) for p in prompts])
        tokens = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)  # [b, s]
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p)
        self.cache.select(rows)
        logits = self.lm.logits(tokens, self.cache)  # [b, s, vocab] on the last stage
        self.cache.advance(lengths)
        sampled = self.logits = None
        if logits is not None:
            last = logits[torch.arange(len(rows)), lengths.to(logits.device) - 1]  # [b, vocab]
            sampled = torch.cat([self._sample(last[i : i + 1], r) for i, r in enumerate(rows)])
            self.logits = last
        return broadcast_token(sampled, self.lm.ps, len(rows)).tolist()

    def _sample(self, logits: torch.Tensor, row: int) -> torch.Tensor:
        """One row's token, or FAILED when its sampling raised: the token is still broadcast, so
        every rank stays in step and only that row's request fails."""
        try:
            return sample(logits, self.params[row], self.generators[row])
        except (RuntimeError, ValueError):
            return torch.tensor([FAILED])


def follow(lm, max_batch_size: int = DEFAULT_MAX_REQUESTS) -> None:
    """Loop of the ranks other than the serving one: run each step it broadcasts, until a stop."""
    core = EngineCore(lm, max_batch_size)
    while (plan := broadcast_json(None, lm)) is not None:
        core.step(plan)


class Engine:
    """The serving rank's scheduler: `submit` from any thread; `start` runs the steps in a thread
    of their own (or call `run_until_idle` from one thread); `stop` ends it and the followers.
    `run(requests)` submits and runs them to the end. `lockstep`: every rank of the replica runs
    the same engine on the same requests (no plan broadcast; no rank follows)."""

    def __init__(
        self,
        lm,
        max_batch_size: int = DEFAULT_MAX_REQUESTS,
        *,
        lockstep: bool = False,
        max_sequence_length: int | None = None,
    ):
        self.core = EngineCore(lm, max_batch_size, max_sequence_length)
        self.lm, self.lockstep = lm, lockstep
        self._waiting: deque[Request] = deque()
        self._active: dict[int, Request] = {}  # row -> its request
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # for tests and benchmarks: steps run, requests admitted, the most rows in one decode step
        self.steps = {"prefill": 0, "decode": 0, "admitted": 0, "peak_batch": 0}

    def submit(self, req: Request) -> Request:
        if req.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {req.max_new_tokens}")
        check_prompt(req.prompt, req.max_new_tokens, self.lm.max_length, self.lm.vocab_size)
        with self._wake:
            if self._stopping:
                raise RuntimeError("the engine is stopped")
            self._waiting.append(req)
            self._wake.notify()
        return req

    def run(self, requests: list[Request]) -> list[GenerationOutput]:
        """Submit `requests` and wait for their answers (run here unless `start`ed)."""
        for req in requests:
            self.submit(req)
        if self._thread is None:
            self.run_until_idle()
        return [req.result() for req in requests]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish nothing more: requests still waiting or running fail; the followers stop."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        else:
            self._broadcast(None)
        self._fail_all(RuntimeError("the engine stopped"))

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while not (self._stopping or self._waiting or self._active):
                        self._wake.wait()
                    if self._stopping:
                        break
                self.round()
        except BaseException as e:  # a failed step: the ranks may disagree now, so stop serving
            self._fail_all(e)
            with self._wake:
                self._stopping = True
            raise
        finally:
            self._broadcast(None)

    def run_until_idle(self) -> None:
        """Run rounds in this thread until nothing waits or runs (no `start` needed)."""
        while self._waiting or self._active:
            self.round()

    def round(self) -> None:
        """Admit the newcomers that fit into free rows (one prefill step), then one decode step of all
        the active rows."""
        free = [r for r in range(len(self.core.params)) if r not in self._active]
        with self._wake:
            n = min(len(free), len(self._waiting))
            newcomers = [self._waiting.popleft() for _ in range(n)]
        if newcomers:
            rows = free[:n]
            self._active.update(zip(rows, newcomers))
            plan = {"prefill": rows, "tokens": [r.prompt for r in newcomers]}
            plan["seeds"] = [r.seed for r in newcomers]
            plan["sampling"] = [[r.params.temperature, r.params.top_k, r.params.top_p]
                                for r in newcomers]  # fmt: skip
            self._run(plan, rows)
            self.steps["prefill"] += 1
            self.steps["admitted"] += n
        if self._active:
            rows = sorted(self._active)
            self.steps["peak_batch"] = max(self.steps["peak_batch"], len(rows))
            cached = [r for r in rows if self._active[r].use_cache]
            if cached:
                tokens = [self._active[r].tokens[-1] for r in cached]
                self._run({"decode": cached, "tokens": tokens}, cached)
            if rerun := [r for r in rows if r in self._active and not self._active[r].use_cache]:
                seqs = [self._active[r].prompt + self._active[r].tokens for r in rerun]
                self._run({"prefill": rerun, "tokens": seqs}, rerun)
            self.steps["decode"] += 1

    def _broadcast(self, obj) -> None:
        if not self.lockstep:
            broadcast_json(obj, self.lm)

    def _run(self, plan: dict, rows: list[int]) -> None:
        self._broadcast(plan)
        error: BaseException = RuntimeError("sampling failed")
        try:
            tokens = self.core.step(plan)
        except Exception as e:
            if self.lm.ps.tp_size * self.lm.ps.pp_size > 1:
                raise  # the ranks may disagree now: stop serving (the loop fails everything)
            tokens, error = [FAILED] * len(rows), e  # one process: only this step's requests fail
        for i, (row, token) in enumerate(zip(rows, tokens)):
            req = self._active[row]
            if token == FAILED:
                del self._active[row]
                req._finish(None, error)
                continue
            if req.return_logits and self.core.logits is not None:
                req.step_logits.append(self.core.logits[i].float().cpu())
            req._push(token)
            reason = _finish_reason(req)
            if reason is not None:
                del self._active[row]
                req._finish(reason)

    def _fail_all(self, error: BaseException) -> None:
        with self._wake:
            pending = list(self._waiting) + list(self._active.values())
            self._waiting.clear()
            self._active.clear()
        for req in pending:
            req._finish(None, error)


def _finish_reason(req: Request) -> str | None:
    if req.cancelled:
        return "cancelled"
    if req.eod is not None and req.tokens[-1] == req.eod:
        return "eod"
    if req.stop is not None and req.stop(req.tokens):
        return "stop"
    return "length" if len(req.tokens) >= req.max_new_tokens else None
