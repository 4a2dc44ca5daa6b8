"""Decoder-only GPT, built for one pipeline stage (or virtual chunk) at a time.

    chunks = build_model_chunks(cfg, ps, cfg.padded_vocab_size(vocab_size))
    loss = chunks[0](tokens, position_ids, None, labels)   # [b, s] per-token loss (pp = 1)

Parameter names use global layer numbers (`decoder.layers.{i}.…`), and each parameter's full value
comes from a generator seeded by (seed, name), so every tp/pp/vpp layout holds the same model.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.config import Config, ConfigError
from megatron_lite.model.transformer import InferenceParams, TransformerBlock
from megatron_lite.parallel_state import ParallelState
from megatron_lite.tensor_parallel.cross_entropy import token_log_probs
from megatron_lite.tensor_parallel.layers import ColumnParallelLinear, VocabParallelEmbedding
from megatron_lite.tensor_parallel.mappings import scatter_to_sequence_parallel_region
from megatron_lite.tensor_parallel.random import get_rng_tracker
from megatron_lite.tensor_parallel.utils import initialize_parameter, set_default_attributes

WORD_EMBEDDING = "embedding.word_embeddings.weight"


class LanguageModelEmbedding(nn.Module):
    """Word (vocab-parallel) + learned position embeddings -> dropout; output [s, b, h]
    ([s/tp, b, h] under sequence parallelism)."""

    def __init__(
        self, cfg: Config, ps: ParallelState, padded_vocab_size: int, vocab_size: int | None = None
    ):
        super().__init__()
        m = cfg.model
        self.tp_group = ps.tp_group
        self.sequence_parallel = cfg.parallel.sequence_parallel and ps.tp_size > 1
        self.learned_positions = m.position_embedding_type == "learned_absolute"
        self.dropout = m.hidden_dropout
        # without position embeddings to add, the word embedding reduce-scatters straight away
        self.word_embeddings = VocabParallelEmbedding(
            padded_vocab_size,
            m.hidden_size,
            tp_group=ps.tp_group,
            init_std=m.init_method_std,
            reduce_scatter_embeddings=self.sequence_parallel and not self.learned_positions,
        )
        self.word_embeddings.weight.init_rows = vocab_size  # padded rows start (and stay) zero
        if self.learned_positions:
            # no default init (initialize_model draws every weight; on the meta device, where the
            # estimator and checkpoint conversion build the model, torch's init costs a second)
            positions = torch.empty(m.max_position_embeddings, m.hidden_size)
            self.position_embeddings = nn.Embedding.from_pretrained(positions, freeze=False)
            self.position_embeddings.weight.init_std = m.init_method_std
            set_default_attributes(self.position_embeddings.weight)

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        x = self.word_embeddings(tokens)  # [b, s, h], or already [s/tp, b, h]
        if not self.word_embeddings.reduce_scatter_embeddings:
            if self.learned_positions:
                if position_ids is None:
                    position_ids = torch.arange(tokens.shape[1], device=tokens.device)[None]
                x = x + self.position_embeddings(position_ids)
            x = x.transpose(0, 1).contiguous()  # [s, b, h]
            if self.sequence_parallel:
                x = scatter_to_sequence_parallel_region(x, self.tp_group)
        if self.training and self.dropout > 0:
            if self.sequence_parallel:
                with get_rng_tracker().fork():
                    x = F.dropout(x, self.dropout, training=True)
            else:
                x = F.dropout(x, self.dropout, training=True)
        return x


class GPTModel(nn.Module):
    """Embedding (pre_process), the given global layers, final norm and output layer (post_process)."""

    def __init__(
        self,
        cfg: Config,
        ps: ParallelState,
        padded_vocab_size: int,
        layer_numbers: range,
        pre_process: bool = True,
        post_process: bool = True,
        vocab_size: int | None = None,
    ):
        """`vocab_size`: the true vocabulary (default: `padded_vocab_size`, no padding). Padded rows
        are never a class: their logits are -inf, so the loss, the gradients and any softmax over the
        vocabulary are those of the unpadded model, whatever padding the tp size asks for."""
        super().__init__()
        m = cfg.model
        if padded_vocab_size % ps.tp_size != 0:
            raise ConfigError(
                f"padded vocabulary ({padded_vocab_size}) must be divisible by the tp size "
                f"({ps.tp_size}); use cfg.padded_vocab_size(vocab_size)"
            )
        vocab_size = padded_vocab_size if vocab_size is None else vocab_size
        if not 0 < vocab_size <= padded_vocab_size:
            raise ConfigError(
                f"vocabulary ({vocab_size}) must be in 1..padded vocabulary ({padded_vocab_size})"
            )
        per_rank = padded_vocab_size // ps.tp_size
        # this rank's logit columns that are real classes; the rest are padding
        self.real_columns = min(per_rank, max(0, vocab_size - ps.tp_rank * per_rank))
        self.columns = per_rank
        self.cfg, self.tp_group = cfg, ps.tp_group
        self.pre_process, self.post_process = pre_process, post_process
        self.layer_numbers = layer_numbers
        self.tie = m.tie_embeddings
        self.input_tensor: torch.Tensor | None = None
        if pre_process:
            self.embedding = LanguageModelEmbedding(cfg, ps, padded_vocab_size, vocab_size)
        self.decoder = TransformerBlock(
            cfg, ps.tp_group, layer_numbers, final_norm=post_process, ps=ps
        )
        if post_process:
            self.output_layer = ColumnParallelLinear(
                m.hidden_size,
                padded_vocab_size,
                tp_group=ps.tp_group,
                bias=False,
                sequence_parallel=cfg.parallel.sequence_parallel,
                init_std=m.init_method_std,
                skip_weight_param_allocation=self.tie and pre_process,
            )
            if self.output_layer.weight is not None:
                self.output_layer.weight.init_rows = vocab_size
        if self.tie and ps.pp_size > 1:
            # the first stage's word embedding and the last stage's copy of it are kept equal by
            # all-reducing their gradients over the embedding group (finalize_model_grads)
            if pre_process:
                self.embedding.word_embeddings.weight.shared_embedding = True
            if post_process:
                self.output_layer.weight.shared_embedding = True
                self.output_layer.weight.init_name = WORD_EMBEDDING
        for p in self.parameters():
            set_default_attributes(p)

    def set_input_tensor(self, input_tensor: torch.Tensor | list | None) -> None:
        """Hidden states from the previous stage ([s, b, h], [s/tp, b, h] under sequence parallelism)."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def output_weight(self) -> torch.Tensor:
        if self.tie and self.pre_process:
            return self.embedding.word_embeddings.weight
        return self.output_layer.weight

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inference_params: InferenceParams | None = None,
    ) -> torch.Tensor:
        """attention_mask: None for causal, or bool [b or 1, 1, s, s] with True = masked.
        `inference_params`: a KV cache for incremental decoding (tokens are the new ones only;
        positions continue from its offset, which the caller advances after the call).

        Returns the per-token loss [b, s] (post_process with labels), the tp-sharded logits
        [b, s, V/tp] (post_process without labels), or the hidden states to send on.
        """
        if self.pre_process:
            if inference_params is not None and position_ids is None:
                position_ids = inference_params.position_ids(tokens.shape[1], tokens.device)
            x = self.embedding(tokens, position_ids)
        else:
            if self.input_tensor is None:
                raise RuntimeError("a chunk without pre_process needs set_input_tensor() first")
            x = self.input_tensor
        x = self.decoder(x, attention_mask, inference_params)
        if not self.post_process:
            return x
        batch_first = labels is None and not self.output_layer.sequence_parallel
        if batch_first:  # logits wanted [b, s, V/tp]: turn the hidden states (h << V), not them
            x = x.transpose(0, 1)
        logits, _ = self.output_layer(x, self.output_weight())  # [s, b, V/tp] or [b, s, V/tp]
        if self.real_columns < self.columns:  # padded vocabulary entries are never a class
            logits[..., self.real_columns :] = float("-inf")
        if labels is None:
            return logits if batch_first else logits.transpose(0, 1).contiguous()
        logp = token_log_probs(logits, labels.transpose(0, 1), self.tp_group, inplace=True)
        return (-logp).transpose(0, 1).contiguous()  # [b, s]: the per-token loss


def initialize_model(model: nn.Module, seed: int, ps: ParallelState) -> None:
    """Every parameter = its shard of the full tensor drawn from a (seed, global name) generator."""
    for name, p in model.named_parameters():
        initialize_parameter(p, name, seed, ps.tp_rank, ps.tp_size)


def chunk_layer_numbers(num_layers: int, pp_size: int, pp_rank: int, vpp: int, chunk: int) -> range:
    """Global layers of virtual chunk `chunk` on pipeline rank `pp_rank`."""
    per_chunk = num_layers // (pp_size * vpp)
    first = (chunk * pp_size + pp_rank) * per_chunk
    return range(first, first + per_chunk)


def stage_chunks(
    num_layers: int, pp_size: int, pp_rank: int, vpp: int
) -> list[tuple[range, bool, bool]]:
    """(global layers, pre_process, post_process) of each virtual chunk of pipeline rank `pp_rank`:
    the embedding on the first chunk of the first stage, the output layer on the last of the last."""
    return [
        (
            chunk_layer_numbers(num_layers, pp_size, pp_rank, vpp, c),
            pp_rank == 0 and c == 0,
            pp_rank == pp_size - 1 and c == vpp - 1,
        )
        for c in range(vpp)
    ]


def build_meta_chunk(cfg: Config, pp_rank: int, padded_vocab_size: int, chunk: int = 0) -> GPTModel:
    """Virtual chunk `chunk` of pipeline rank `pp_rank` at full (tp = 1) shapes on the meta device:
    the real model's names, shapes and shard tags with nothing allocated (checkpoint conversion
    and the memory estimate read it; a tp rank's shapes follow from the tags)."""
    pp = cfg.parallel.pipeline_model_parallel_size
    ps = dataclasses.replace(ParallelState.single(), pp_size=pp, pp_rank=pp_rank)
    one = dataclasses.replace(cfg.parallel, tensor_model_parallel_size=1, sequence_parallel=False)
    full_cfg = dataclasses.replace(cfg, parallel=one)
    vpp = cfg.virtual_pipeline_size or 1
    layers, pre, post = stage_chunks(cfg.model.num_layers, pp, pp_rank, vpp)[chunk]
    with torch.device("meta"):
        return GPTModel(full_cfg, ps, padded_vocab_size, layers, pre, post)


def build_model_chunks(
    cfg: Config,
    ps: ParallelState,
    padded_vocab_size: int,
    device: torch.device | str | None = None,
    *,
    vocab_size: int | None = None,
) -> list[GPTModel]:
    """This rank's model chunks: one, or `vpp` for the interleaved schedule (docs/internals.md).
    `vocab_size`: the true vocabulary, whose padding up to `padded_vocab_size` never counts."""
    vpp = ps.vpp_size or cfg.virtual_pipeline_size or 1
    m = cfg.model
    if m.num_layers % (ps.pp_size * vpp) != 0:
        raise ConfigError(
            f"--num-layers ({m.num_layers}) must be divisible by pipeline size ({ps.pp_size}) x "
            f"virtual chunks ({vpp})"
        )
    chunks = []
    for layers, pre, post in stage_chunks(m.num_layers, ps.pp_size, ps.pp_rank, vpp):
        model = GPTModel(
            cfg,
            ps,
            padded_vocab_size,
            layers,
            pre_process=pre,
            post_process=post,
            vocab_size=vocab_size,
        )
        initialize_model(model, cfg.train.seed, ps)
        if device is not None:
            model.to(device)
        chunks.append(model)
    return chunks
