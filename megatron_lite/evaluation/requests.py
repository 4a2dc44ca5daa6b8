"""The three request types of lm-evaluation-harness, answered by a megatron_lite model at any layout.

    scorer = Scorer(load_model("ckpt", ps), tokenizer, batch_size=16)
    scorer.loglikelihood([("The capital of France is", " Paris")])   # [(log p, is_greedy)]
    scorer.loglikelihood_rolling(["a whole document ..."])           # [log p of every token]
    scorer.generate_until([("def f(x):", {"until": ["\\ndef"], "max_gen_toks": 64})])

Every rank of the world calls the same method with the same requests. Requests are sorted by
length (longest first, so a batch's padding is small and memory peaks at once), dealt round-robin
over the data-parallel replicas, run in batches through the model's stages (right-padded: the
attention is causal, so padding after a request never changes its logits), and the results are
broadcast from the last stage and gathered over dp, so every rank returns all of them in order.
Tokenization follows lm-eval's HF model: trailing spaces of a context move to its continuation,
and the continuation's tokens are those of context + continuation past the context's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_lite import comm
from megatron_lite import device as device_mod
from megatron_lite.data.tokenizer import Tokenizer
from megatron_lite.inference.generation import LanguageModel, SamplingParams, generate_batch
from megatron_lite.tensor_parallel.cross_entropy import token_log_probs

TokenPair = tuple[list[int], list[int]]


def rolling_windows(tokens: list[int], prefix: int, max_len: int) -> list[TokenPair]:
    """Disjoint windows scoring every token once with up to `max_len` tokens of context
    (lm-eval's get_rolling_token_windows with context_len 1, then make_disjoint_window)."""
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    windows = [([prefix] + tokens[: first - 1], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        windows.append((tokens[max(end - max_len - 1, 0) : end - 1], tokens[end - n : end]))
        done = end
    return [(ctx[: len(ctx) - (len(cont) - 1)], cont) for ctx, cont in windows]


class Scorer:
    """Answers log-likelihood, rolling log-likelihood and generation requests with `lm`."""

    def __init__(self, lm: LanguageModel, tokenizer: Tokenizer, batch_size: int = 8) -> None:
        self.lm, self.tok, self.batch_size = lm, tokenizer, batch_size
        self.ps = lm.ps
        self.comm_device = device_mod.comm_device(self.ps.backend)

    # -- tokenization ------------------------------------------------------------------------------
    def encode_pair(self, context: str, continuation: str) -> TokenPair:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.tok.eod], self.tok.tokenize(continuation)
        whole, ctx = self.tok.tokenize(context + continuation), self.tok.tokenize(context)
        return ctx, whole[len(ctx) :]

    # -- requests ----------------------------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(sum of log p of the continuation's tokens, whether greedy decoding gives them)."""
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in requests])

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """log p of each whole text, scored in disjoint windows of the model's length."""
        windows, owner = [], []
        for i, text in enumerate(texts):
            for w in rolling_windows(self.tok.tokenize(text), self.tok.eod, self.lm.max_length):
                windows.append(w)
                owner.append(i)
        totals = [0.0] * len(texts)
        for i, (ll, _) in zip(owner, self.loglikelihood_tokens(windows)):
            totals[i] += ll
        return totals

    def loglikelihood_tokens(self, pairs: Sequence[TokenPair]) -> list[tuple[float, bool]]:
        """A continuation longer than the model is scored in pieces of its length, each with the
        tokens before it as context (a sliding window), and the pieces summed."""
        max_len = self.lm.max_length
        inputs, owner = [], []
        for k, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise ValueError("a continuation must have at least one token")
            for i in range(0, len(cont), max_len):
                piece = cont[i : i + max_len]
                inputs.append(((ctx + cont[: i + len(piece)])[-(max_len + 1) :][:-1], piece))
                owner.append(k)
        order = sorted(range(len(inputs)), key=lambda i: (-len(inputs[i][0]), inputs[i][0]))
        mine = order[self.ps.dp_rank :: self.ps.dp_size]
        rows = []
        for start in range(0, len(mine), self.batch_size):
            rows += self._score_batch([inputs[i] for i in mine[start : start + self.batch_size]])
        got = self._from_last_stage(torch.tensor(rows, dtype=torch.float64).view(-1, 2), order)
        out = [[0.0, True] for _ in pairs]
        for k, (ll, greedy) in zip(owner, got.tolist()):
            out[k] = [out[k][0] + ll, out[k][1] and greedy > 0.5]
        return [(ll, greedy) for ll, greedy in out]

    def _score_batch(self, batch: list[TokenPair]) -> list[list[float]]:
        width = max(len(inp) for inp, _ in batch)
        tokens = torch.zeros(len(batch), width, dtype=torch.long)  # [b, s], right-padded
        for row, (inp, _) in enumerate(batch):
            tokens[row, : len(inp)] = torch.tensor(inp)
        logits = self.lm.logits(tokens)  # [b, s, vocab] on the last stage, None elsewhere
        if logits is None:
            return [[0.0, 0.0]] * len(batch)
        out = []
        for row, (inp, cont) in enumerate(batch):
            n = len(inp)
            scores = logits[row, n - len(cont) : n]  # [len(cont), vocab]
            target = torch.tensor(cont, device=scores.device)
            ll = token_log_probs(scores, target).sum().item()
            out.append([ll, float(bool((scores.argmax(-1) == target).all()))])
        return out

    def generate_until(self, requests: Sequence[tuple[str, dict]]) -> list[str]:
        """Continue each context until one of `until` (or the end-of-document token), at most
        `max_gen_toks` tokens; greedy unless `temperature` > 0 (then `top_p`, `top_k`, `seed`).
        The text returned stops before the first stop sequence, as lm-eval's does."""
        encoded = [self.tok.tokenize(c) for c, _ in requests]
        order = sorted(range(len(requests)), key=lambda i: (-len(encoded[i]), i))
        mine = order[self.ps.dp_rank :: self.ps.dp_size]
        jobs = [self._generation_job(encoded[i], requests[i][1], i) for i in mine]
        texts: list[str] = [""] * len(jobs)
        # a batch: neighbours in length order that share the sampling settings and token budget
        start = 0
        while start < len(jobs):
            end = start + 1
            while (
                end < len(jobs)
                and end - start < self.batch_size
                and jobs[end][1:3] == jobs[start][1:3]
            ):
                end += 1
            for k, text in zip(range(start, end), self._generate_batch(jobs[start:end])):
                texts[k] = text
            start = end
        return self._gather_texts(texts, order)

    def _generation_job(self, prompt: list[int], kw: dict, index: int) -> tuple:
        """(prompt, sampling params, max new tokens, stop strings, seed) of one request."""
        until = [u for u in kw.get("until", []) if u]
        max_new = int(kw.get("max_gen_toks", 256))
        prompt = prompt[-max(self.lm.max_length - max_new, 1) :]  # keep the end, as lm-eval
        max_new = min(max_new, self.lm.max_length - len(prompt))
        temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample", True) else 0.0
        params = SamplingParams(temperature, int(kw.get("top_k", 0)), float(kw.get("top_p", 1.0)))
        seed = int(kw.get("seed", 0)) + index  # per request, so any layout draws alike
        return prompt, params, max_new, until, seed

    def _text_of(self, tokens: list[int]) -> str:
        return self.tok.detokenize([t for t in tokens if t != self.tok.eod])

    def _generate_batch(self, jobs: list[tuple]) -> list[str]:
        """One KV-cached batch of prompts (`generate_batch`); each stops at its own stop strings."""
        params, max_new = jobs[0][1], jobs[0][2]

        def stop(i: int, tokens: list[int]) -> bool:
            text = self._text_of(tokens)
            return any(u in text for u in jobs[i][3])

        outs = generate_batch(
            self.lm,
            [j[0] for j in jobs],
            max_new,
            params,
            eod=self.tok.eod,
            seeds=[j[4] for j in jobs],
            stop=stop,
        )
        texts = []
        for out, job in zip(outs, jobs):
            text = self._text_of(out.tokens)
            for u in job[3]:
                text = text.split(u)[0]
            texts.append(text)
        return texts

    def _gather_texts(self, mine: list[str], order: list[int]) -> list[str]:
        encoded = [t.encode("utf-8") for t in mine]
        width = torch.tensor([max((len(b) for b in encoded), default=0)], dtype=torch.float64)
        comm.all_reduce_max_over(width, self.ps.dp_group)
        rows = torch.zeros(len(mine), int(width.item()) + 1, dtype=torch.float64)
        for r, b in enumerate(encoded):  # [length, byte 0, byte 1, ...]
            rows[r, 0] = len(b)
            rows[r, 1 : len(b) + 1] = torch.tensor(list(b), dtype=torch.float64)
        got = self._from_last_stage(rows, order)
        return [
            bytes(got[i, 1 : int(got[i, 0]) + 1].long().tolist()).decode()
            for i in range(len(order))
        ]

    # -- collecting results ------------------------------------------------------------------------
    def _from_last_stage(self, mine: torch.Tensor, order: list[int]) -> torch.Tensor:
        """This replica's rows (valid on the last stage) for requests `order[dp_rank::dp]` ->
        every request's row, in request order, on every rank."""
        ps = self.ps
        per = -(-len(order) // ps.dp_size)  # the most any replica holds: equal shapes over dp
        buf = torch.zeros(per, mine.shape[1], dtype=torch.float64)
        buf[: len(mine)] = mine
        buf = buf.to(self.comm_device)
        if ps.tp_size * ps.pp_size > 1:
            comm.broadcast(buf, ps.mp_ranks[(ps.pp_size - 1) * ps.tp_size], ps.mp_group)
        gathered = torch.empty(per * ps.dp_size, buf.shape[1], dtype=buf.dtype, device=buf.device)
        if ps.dp_size > 1:
            comm.all_gather(gathered, buf, ps.dp_group)
        else:
            gathered.copy_(buf)
        gathered = gathered.cpu().view(ps.dp_size, per, -1)
        out = torch.zeros(len(order), buf.shape[1], dtype=torch.float64)
        for r in range(ps.dp_size):
            idx = order[r :: ps.dp_size]
            out[idx] = gathered[r, : len(idx)]
        return out
