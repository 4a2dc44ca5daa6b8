"""Rotary position embedding (RoFormer, Su et al. 2021) and its long-context scalings, in one place.

Every scheme changes only two things: the inverse frequencies of the rotated channel pairs and an
attention factor that multiplies cos and sin (so q.k grows by its square). `rope_type` of a
ModelConfig names the scheme (`ModelConfig` validates that at most one is set):

- default: inv_freq_i = base^(-2i/d) over the first d = kv_channels x --rotary-percent channels;
- linear (--rotary-seq-len-interpolation-factor F; Chen et al. 2023, position interpolation):
  positions divided by F, i.e. every inv_freq / F;
- llama3 (--use-rope-scaling; Llama 3.1): wavelengths shorter than orig / high_freq_factor kept,
  longer than orig / low_freq_factor divided by the factor, a smooth blend in between;
- yarn (--rope-type yarn; Peng et al. 2023, "YaRN", sections 3.2-3.4): per pair, a linear ramp
  between interpolated (inv_freq / factor) and original frequencies over the pairs that turn between
  beta_slow and beta_fast times in the original context, and attention factor 0.1 ln(factor) + 1
  (with mscale / mscale_all_dim as DeepSeek's variant: their ratio).

The numbers follow Megatron-core's and transformers' definitions of the same schemes, so an imported
HF model gives HF's logits. Channels are rotated in halves (GPT-NeoX / HF Llama `rotate_half`).
"""

from __future__ import annotations

import math

import torch

from megatron_lite.config import ModelConfig

LLAMA3_ORIGINAL_POSITIONS = 8192  # Megatron's fixed value for --use-rope-scaling
YARN_ORIGINAL_POSITIONS = 4096  # Megatron-core's YaRN default


def rope_type(m: ModelConfig) -> str:
    """'default', 'linear', 'llama3' or 'yarn' (HF's rope_type names)."""
    if m.rotary_seq_len_interpolation_factor is not None:
        return "linear"
    if m.use_rope_scaling:
        return "llama3"
    if m.rope_type == "yarn":
        return "yarn"
    return "default"


def rotary_dim(m: ModelConfig) -> int:
    """Channels per head the rotary embedding rotates (the rest pass through unchanged)."""
    return int(m.kv_channels * m.rotary_percent)


def original_positions(m: ModelConfig) -> int:
    if m.original_max_position_embeddings is not None:
        return m.original_max_position_embeddings
    return YARN_ORIGINAL_POSITIONS if rope_type(m) == "yarn" else LLAMA3_ORIGINAL_POSITIONS


def _llama3(inv_freq: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    orig, factor = original_positions(m), m.rope_scaling_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > orig / m.low_freq_factor, inv_freq / factor, inv_freq)
    smooth = (orig / wavelen - m.low_freq_factor) / (m.high_freq_factor - m.low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= orig / m.high_freq_factor) & (wavelen <= orig / m.low_freq_factor)
    return torch.where(medium, blended, scaled)


def _yarn_pair(rotations: float, dim: int, base: float, orig: int) -> float:
    """The (fractional) channel pair that turns `rotations` times over `orig` positions."""
    return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_attention_factor(factor: float, mscale: float, mscale_all_dim: float) -> float:
    def get(scale: float, ms: float) -> float:
        return 1.0 if scale <= 1 else 0.1 * ms * math.log(scale) + 1.0

    return get(factor, mscale) / get(factor, mscale_all_dim)


def _yarn(inv_freq: torch.Tensor, m: ModelConfig, dim: int) -> torch.Tensor:
    orig, base = original_positions(m), float(m.rotary_base)
    low = max(math.floor(_yarn_pair(m.beta_fast, dim, base, orig)), 0)
    high = min(math.ceil(_yarn_pair(m.beta_slow, dim, base, orig)), dim - 1)
    if low == high:
        high += 0.001  # a one-pair ramp still needs a slope
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: the original (extrapolated) frequency, 0: the interpolated one
    return inv_freq / m.rotary_scaling_factor * (1 - keep) + inv_freq * keep


def inv_frequencies(m: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [rotary_dim / 2] in fp32, attention factor) of `m`'s scheme."""
    dim = rotary_dim(m)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (float(m.rotary_base) ** exponents)
    kind = rope_type(m)
    if kind == "linear":
        return inv_freq / m.rotary_seq_len_interpolation_factor, 1.0
    if kind == "llama3":
        return _llama3(inv_freq, m), 1.0
    if kind == "yarn":
        factor = yarn_attention_factor(m.rotary_scaling_factor, m.mscale, m.mscale_all_dim)
        return _yarn(inv_freq, m, dim), factor
    return inv_freq, 1.0


def rotary_cos_sin(seq_len: int, m: ModelConfig, device: torch.device):
    """cos/sin tables [s, 1, 1, rotary_dim] for positions 0 .. s-1, times the attention factor."""
    inv_freq, attention_factor = inv_frequencies(m)
    positions = torch.arange(seq_len, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None, None, :].to(device)
    return emb.cos() * attention_factor, emb.sin() * attention_factor


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [s, b, n, d]: its first cos.shape[-1] channels rotated in halves, the rest unchanged."""
    rot = cos.shape[-1]
    x_rot, x_pass = (x, None) if rot == x.shape[-1] else (x[..., :rot], x[..., rot:])
    x1, x2 = x_rot.chunk(2, dim=-1)
    out = (x_rot * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)
    return out if x_pass is None else torch.cat([out, x_pass], dim=-1)
