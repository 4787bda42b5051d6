"""Pieces shared by the native families: RMSNorm, rotary embeddings, bidirectional attention, SwiGLU.

Everything runs in the dtype of the weights; only the normalisation statistics and the rotary
products are computed in float32 (as both families' own code does).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale and no bias."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The mean of squares loses precision (and can overflow in fp16), so take it in fp32.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


@dataclass
class AttentionInputs:
    """Per-forward tensors every layer shares: rotary tables and the key-padding mask."""

    cos: torch.Tensor             # (B, 1, L, D) float32
    sin: torch.Tensor             # (B, 1, L, D) float32
    key_mask: torch.Tensor | None  # (B, 1, 1, L) bool, True = attend; None = no padding


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) mask (True = real token) -> (B, L) int64 positions restarting at 0 on the first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def key_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) mask -> (B, 1, 1, L) bool that masks pad keys only.

    Query rows are never masked: a row whose every key is masked makes SDPA return NaN. A row with
    no real token at all attends to everything instead (its output is never used).
    """
    keep = attention_mask.bool()
    keep = keep | ~keep.any(-1, keepdim=True)
    return keep[:, None, None, :]


def rotary_tables(pos: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) positions -> cos, sin tables (B, 1, L, head_dim) in float32 (rotate-half layout)."""
    # Computed per call rather than kept as a buffer: a buffer would stay on the meta device
    # when weights are loaded with assign=True, and this costs head_dim/2 elements.
    exponent = torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta ** exponent)                      # (D/2,)
    freqs = pos.float()[..., None] * inv_freq                 # (B, L, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]          # (B, 1, L, D)
    return emb.cos(), emb.sin()


def attention_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     head_dim: int, theta: float) -> AttentionInputs:
    """Rotary tables and key mask for one forward; attention_mask None means no padding.

    A batch without padding gets no mask at all (one host sync to find out): SDPA's flash kernel
    takes no mask, so an all-True mask would force a slower kernel on GPU.
    """
    if attention_mask is None or bool(attention_mask.all()):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return AttentionInputs(*rotary_tables(pos, head_dim, theta), key_mask=None)
    cos, sin = rotary_tables(position_ids(attention_mask), head_dim, theta)
    return AttentionInputs(cos, sin, key_padding_mask(attention_mask))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, L, D) queries or keys by the tables; product in float32, result in x's dtype."""
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


def self_attention(x: torch.Tensor, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear,
                   o_proj: nn.Linear, n_heads: int, n_kv_heads: int, inputs: AttentionInputs) -> torch.Tensor:
    """Bidirectional multi-head attention with grouped KV heads: (B, L, C) -> (B, L, C)."""
    B, L, _ = x.shape
    q = q_proj(x).view(B, L, n_heads, -1).transpose(1, 2)     # (B, H, L, D)
    k = k_proj(x).view(B, L, n_kv_heads, -1).transpose(1, 2)  # (B, Hkv, L, D)
    v = v_proj(x).view(B, L, n_kv_heads, -1).transpose(1, 2)  # (B, Hkv, L, D)
    q = apply_rotary(q, inputs.cos, inputs.sin)
    k = apply_rotary(k, inputs.cos, inputs.sin)
    # No causal mask: every position sees every real position. With grouped heads, KV head j
    # serves query heads j*rep .. (j+1)*rep-1 (the Llama/Qwen2 grouping), which SDPA's enable_gqa
    # does without materialising the repeated keys and values.
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=inputs.key_mask,
                                       enable_gqa=n_kv_heads != n_heads)  # (B, H, L, D)
    return o_proj(y.transpose(1, 2).reshape(B, L, -1))        # (B, L, H*D) -> (B, L, C)


def swiglu(x: torch.Tensor, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> torch.Tensor:
    """down(silu(gate(x)) * up(x))."""
    return down(F.silu(gate(x)) * up(x))


def init_weights(module: nn.Module, std: float) -> None:
    """Normal(0, std) for linear and embedding weights, zero biases (RMSNorm scales stay 1)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
