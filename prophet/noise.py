"""Counter-based randomness: a uniform is a pure function of (row seed, step, position, token).

No generator state and no Python loop over rows: one call draws for the whole batch, and a row's
draws depend only on its own seed, the forward pass it is at and the window positions it
samples, never on the batch size, the slot it sits in or the device. The function is 32-bit
integer hashing (Wellons' lowbias32) carried in int64 tensors with every product kept below
2**63, so CPU and GPU compute the same bits; `uniform_reference` is the same function on Python
integers, for tests.
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
TOKEN_STREAM, POSITION_STREAM = 0x1B873593, 0x68E31DA4  # separate the two kinds of draws


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32 for x in [0, 2**32), without int64 overflow (16-bit halves)."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32: a bijective mix of 32-bit values held in int64."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def seed_words(seeds: list[int], device: torch.device) -> torch.Tensor:
    """(N, 2) int64: each seed's low and high 32 bits (seeds taken mod 2**64)."""
    return torch.tensor([[s & _M32, (s >> 32) & _M32] for s in seeds], dtype=torch.long, device=device).reshape(-1, 2)


def counter_key(seed: torch.Tensor, step: torch.Tensor, position: torch.Tensor, stream: int) -> torch.Tensor:
    """(B, 2) seed words, (B,) step, (B, C) window positions -> (B, C) 32-bit keys, one per draw site."""
    h = hash32(seed[:, 0] ^ stream)
    h = hash32(h ^ seed[:, 1])
    h = hash32(h ^ (step & _M32))
    return hash32(h[:, None] ^ position)


def to_uniform(h: torch.Tensor) -> torch.Tensor:
    """32-bit hashes -> float32 uniforms in (0, 1): the top 23 bits, centred in their cell (exact in
    float32, never 0 or 1)."""
    return ((h >> 9) * 2 + 1).float() * (1.0 / (1 << 24))


def position_uniforms(key: torch.Tensor) -> torch.Tensor:
    """(...,) keys of POSITION_STREAM -> (...,) float32 uniforms."""
    return to_uniform(key)


def token_uniforms(key: torch.Tensor, vocab: int) -> torch.Tensor:
    """(n,) keys of TOKEN_STREAM -> (n, vocab) float32 uniforms, one per token."""
    tok = hash32(torch.arange(vocab, dtype=torch.long, device=key.device))
    return to_uniform(hash32(key[:, None] ^ tok[None, :]))


def uniform_reference(seed: int, step: int, position: int, stream: int, token: int | None = None) -> float:
    """The same uniform on Python integers (what any device must reproduce)."""
    def h32(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & _M32
        x ^= x >> 15
        x = (x * 0x846CA68B) & _M32
        return x ^ (x >> 16)
    s = seed % 2 ** 64
    h = h32(h32(h32((s & _M32) ^ stream) ^ (s >> 32)) ^ (step & _M32))
    h = h32(h ^ position)
    if token is not None:
        h = h32(h ^ h32(token))
    return ((h >> 9) * 2 + 1) / (1 << 24)
