"""A deterministic, cheap, padding-invariant fake DLM for tests and benchmarks.

`ScriptedDLM` implements the `DLM` protocol with a small vocabulary. Each row's logits depend
only on that row's own real tokens: a hash of the prompt (positions counted from the first real
token, so left padding changes nothing) picks a hidden answer, an answer length (then EOS/EoT
padding) and the row's readiness point. The logit gap on the answer token ramps up as the
fraction of the window already decided passes that point, plus hashed per-position noise; about
a quarter of the answer positions start with a wrong "decoy" token on top that falls away just
before the row is ready. Under
Prophet, rows therefore commit at mixed steps, some of them wrongly, which exercises every rule,
region and statistic. All arithmetic is integer hashing and element-wise float32, so a row's
logits are bit-identical whatever batch it sits in.

With a cache (`setup_cache`), the model keeps each slot's tokens as a one-layer transformer keeps
keys/values: a pass writes the tokens of the positions it runs, and every scored position reads
the slot as stored, so positions not run since the last refresh are seen as they were then
(Dream-style dual cache staleness shows up in the logits, as in a real model).
"""
from __future__ import annotations

import torch

from prophet.types import last_positions

_P = 2147483647  # 2**31 - 1: keeps every hash product inside int64


def _mix(x: torch.Tensor) -> torch.Tensor:
    """Integer hash of non-negative int64 values below 2**31, result in [0, 2**31)."""
    x = (x * 48271 + 11) % _P
    x = x ^ (x >> 13)
    return (x * 69621 + 7) % _P


def _unit(x: torch.Tensor, m: int) -> torch.Tensor:
    """Hashed ints -> float32 in [0, 1) with m levels."""
    return (x % m).float() / m


class ScriptedDLM:
    """Fake masked-diffusion LM whose window logits are a fixed function of the row's real tokens."""

    family = "scripted"
    default_host = "llada"
    pad_id, mask_id, eos_id, eot_id = 0, 1, 2, 3
    first_content = 4

    def __init__(self, gen_length: int, vocab_size: int = 32, max_length: int = 512,
                 nonfinite_token: int | None = None, device: str | torch.device = "cpu") -> None:
        if vocab_size < 8:
            raise ValueError("vocab_size must be >= 8 (4 special ids and a few content tokens)")
        self.gen_length = gen_length        # window length it scores: the last gen_length columns
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.nonfinite_token = nonfinite_token  # prompts starting with this token get NaN logits
        self.device = torch.device(device)

    query_lead = 0
    _stored: torch.Tensor | None = None  # (slots, length + 1) tokens at each row's own positions

    def logits(self, ids: torch.Tensor, attention_mask: torch.Tensor | None, last: int | None = None) -> torch.Tensor:
        """ids (B, L), attention_mask (B, L) -> (B, L, V) float32 (or the last `last` positions);
        only the last gen_length columns carry signal."""
        B, L = ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(ids, dtype=torch.bool)
        G = self.gen_length
        if L <= G:
            raise ValueError(f"ScriptedDLM(gen_length={G}) needs at least one prompt token before the window")
        h = self._prompt_hash(ids[:, :L - G], attention_mask[:, :L - G])  # (B,)
        out = torch.zeros(B, L, self.vocab_size, device=ids.device)
        out[:, L - G:] = self._window_logits(h, ids[:, L - G:])
        if self.nonfinite_token is not None:
            first = attention_mask.long().argmax(1)  # first real position
            poisoned = ids.gather(1, first[:, None])[:, 0] == self.nonfinite_token
            out[poisoned] = float("nan")
        return last_positions(out, last)

    def setup_cache(self, slots: int, length: int) -> None:
        """Room for `slots` rows of up to `length` positions (one scratch position past the end)."""
        self._stored = torch.full((slots, length + 1), self.pad_id, dtype=torch.long, device=self.device)

    def drop_cache(self) -> None:
        """Forget the stored tokens."""
        self._stored = None

    def move_cache(self, src: list[int], dst: list[int]) -> None:
        """Copy the stored tokens of slots src into slots dst."""
        if src:
            self._stored[torch.tensor(dst)] = self._stored[torch.tensor(src)]

    def cached_logits(self, ids: torch.Tensor, attention_mask: torch.Tensor, slots: torch.Tensor,
                      first: torch.Tensor, width: int, refresh: bool, first_slot: int | None = None) -> torch.Tensor:
        """(B, width, V) logits of columns first .. first + width - 1, computed from the slots as stored
        after writing the positions this pass runs (all real ones on refresh, else the scored ones)."""
        if self._stored is None:
            raise RuntimeError("cached_logits needs setup_cache() first")
        B, L = ids.shape
        cols = torch.arange(L, device=ids.device).expand(B, -1)
        pos = cols - (L - attention_mask.sum(1))[:, None]  # (B, L) each column's position in its row
        run = attention_mask.clone()
        if not refresh:
            run &= (cols >= first[:, None]) & (cols < first[:, None] + width)
        scratch = self._stored.shape[1] - 1
        self._stored[slots[:, None].expand(B, L), torch.where(run, pos, scratch)] = ids
        seen = torch.where(attention_mask, self._stored[slots[:, None], pos.clamp(min=0)], self.pad_id)
        keep = (first[:, None] + torch.arange(width, device=ids.device)).clamp(max=L - 1)  # (B, W)
        out = self.logits(seen, attention_mask)
        return out.gather(1, keep[..., None].expand(-1, -1, out.shape[-1]))

    def _prompt_hash(self, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """(B, P) left-padded prompts -> (B,) hash over real tokens at positions relative to the first one."""
        first = real.long().argmax(1)  # (B,)
        rel = (torch.arange(ids.shape[1], device=ids.device)[None, :] - first[:, None]).clamp(min=0)
        weight = _mix(rel + 12345)  # (B, P) position weights
        return _mix(torch.where(real, (ids + 1) * weight, 0).sum(1) % _P)

    def _window_logits(self, h: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """(B,) prompt hashes and (B, G) current window -> (B, G, V) logits."""
        B, G = window.shape
        V, c0 = self.vocab_size, self.first_content
        dev = window.device
        frac = (window != self.mask_id).sum(1).float() / G  # (B,) fraction already decided
        j = torch.arange(G, device=dev)
        hj = _mix((h[:, None] * 1009 + j) % _P)  # (B, G) per-position hash
        n_content = V - c0
        target = c0 + hj % n_content
        answer_len = G // 2 + h % (G - G // 2 + 1)  # (B,) then EOS padding (EoT first for some rows)
        after = j[None, :] >= answer_len[:, None]
        first_stop = torch.where(h % 3 == 0, self.eot_id, self.eos_id)[:, None]
        target = torch.where(after, torch.where(j[None, :] == answer_len[:, None], first_stop, self.eos_id), target)
        # the row's readiness point r in [0, 1.2) (fraction of the window decided): the answer gap
        # ramps from about 1.5 to 11.5 over a quarter of the window centred on r
        ready = 1.2 * _unit(h, 997)
        ramp = ((frac - ready) * 4 + 0.5).clamp(0, 1)  # (B,)
        jitter = 2 * _unit(hj >> 5, 101) - 1  # (B, G) in [-1, 1)
        gap = torch.where(after, 9 + jitter, 1.5 + 10 * ramp[:, None] + jitter)
        v = torch.arange(V, device=dev)
        noise = 2 * _unit(_mix((hj[..., None] * V + v) % _P), 1000)  # (B, G, V) in [0, 2)
        logits = noise.masked_fill((v == self.mask_id) | (v == self.pad_id), -5.0)
        logits = logits.scatter(2, target[..., None], (2 + gap)[..., None])
        # decoys: a wrong content token on top until the row is nearly ready, then falling away
        decoy = c0 + (target - c0 + 1 + (hj // 7) % (n_content - 1)) % n_content
        has_decoy = ~after & (hj % 4 == 0)
        margin = 1.0 - 10 * (frac - ready + 0.15)  # (B,) decoy minus answer logit
        lift = (2 + gap + margin[:, None])[..., None]
        return torch.where(has_decoy[..., None] & (v == decoy[..., None]), lift, logits)
