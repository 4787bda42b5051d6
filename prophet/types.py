"""The two shapes every part of the project agrees on: a model adapter and a decode result."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class DLM(Protocol):
    """A masked diffusion LM behind its family adapter.

    The adapter owns every model quirk: token ids, Dream's one-position logits shift, position
    ids under left padding. The decode loop sees only this interface and holds no literal id.
    """

    family: str                 # "llada", "dream", "hf-mlm", or "scripted" in tests
    default_host: str           # decode schedule that suits this family ("llada" or "dream")
    mask_id: int
    pad_id: int                 # must differ from mask_id
    eos_id: int
    eot_id: int | None          # end-of-turn token (LLaDA-Instruct), None where absent
    max_length: int             # longest prompt + gen_length the model accepts
    vocab_size: int
    device: torch.device

    def logits(self, ids: torch.Tensor, attention_mask: torch.Tensor | None, last: int | None = None) -> torch.Tensor:
        """ids (B, L) int64, attention_mask (B, L) bool (False = left pad; None = no padding, which
        the caller knows without asking the device) -> (B, L, V) logits, or with
        `last` the last `last` positions only, (B, last, V): the decoder needs the window's logits
        alone, and at 8B scale (B, L, V) is gigabytes, so an adapter should run its LM head on
        those positions only.

        Aligned: logits[:, i] scores the token at position i (the Dream shift is applied here).
        Position ids restart at 0 on each row's first real token, so a padded row equals the
        same row unpadded.
        """
        ...


@runtime_checkable
class CachedDLM(DLM, Protocol):
    """A DLM that keeps keys/values between steps (SPEC section 6): the state lives on the model side,
    the decoder passes in which slot each row uses and which positions to score.

    A slot holds one row's sequence at its own positions (0 = first real token). `cached_logits`
    with refresh=True runs every real position and stores all their keys/values; with refresh=False
    it runs only the scored positions, writes theirs, and attends to the slot for the rest.
    """

    query_lead: int  # positions before the first scored one that a cached pass also runs (Dream: 1)

    def setup_cache(self, slots: int, length: int) -> None:
        """Allocate keys/values for `slots` rows of up to `length` positions."""
        ...

    def drop_cache(self) -> None:
        """Free the keys/values."""
        ...

    def cached_logits(self, ids: torch.Tensor, attention_mask: torch.Tensor, slots: torch.Tensor,
                      first: torch.Tensor, width: int, refresh: bool, first_slot: int | None = None) -> torch.Tensor:
        """ids, attention_mask (B, L) left-padded as for `logits`; slots, first (B,) -> aligned logits
        (B, width, V) of columns first[b] .. first[b] + width - 1 (past a row's end: garbage).
        first_slot: a promise that slots == first_slot + arange(B) (the cache is then read in place)."""
        ...

    def move_cache(self, src: list[int], dst: list[int]) -> None:
        """Copy the keys/values of slots src into slots dst (disjoint lists of equal length)."""
        ...


@runtime_checkable
class BlockDLM(DLM, Protocol):
    """A block-diffusion model (SPEC section 8): block-causal attention, so its KV cache is exact.

    Positions are each row's own (0 = first prompt token); blocks of `block_length` are counted
    from there. A query at position q sees a key at k iff k // block_length <= q // block_length.
    """

    block_length: int

    def setup_cache(self, slots: int, length: int) -> None:
        """Allocate keys/values for `slots` rows of up to `length` positions."""
        ...

    def drop_cache(self) -> None:
        """Free the keys/values."""
        ...

    def move_cache(self, src: list[int], dst: list[int]) -> None:
        """Copy the keys/values of slots src into slots dst."""
        ...

    def block_logits(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor,
                     first_slot: int | None = None, scored: bool = True) -> torch.Tensor:
        """ids (B, Q) at positions (B, Q) (-1 = padding), written into slots (B,), attending to the
        slot's keys below lengths (B,) -> logits (B, Q, V) ((B, 0, V) when not scored). With a
        `query_lead` of 1 (Dream's shift) the first column is the position before the scored ones and the
        logits are those of the other columns, aligned: (B, Q - 1, V)."""
        ...


@runtime_checkable
class TextDLM(DLM, Protocol):
    """A DLM with its tokenizer: what the pipeline and the jobs use."""

    name: str

    def encode(self, text: str) -> list[int]:
        """Plain text -> token ids (no chat template)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text, stopping at nothing (the caller cuts at EOS)."""
        ...

    def render_chat(self, messages: Sequence[dict]) -> str:
        """Chat messages -> prompt text through the tokenizer's own chat template."""
        ...


def last_positions(x: torch.Tensor, last: int | None) -> torch.Tensor:
    """(B, L, ...) -> the last `last` positions (B, last, ...), as `DLM.logits(..., last=)` returns
    them; None keeps every position (and last=0 keeps none, where x[:, -0:] would keep all)."""
    return x if last is None else x[:, x.shape[1] - last:]


@dataclass
class DecodeResult:
    """Per-row outcome of one `decode` call, rows in input order."""

    tokens: torch.Tensor           # (N, gen_length) int64, the generated window
    steps_used: torch.Tensor       # (N,) int64 forward passes spent on the row (deciding step counted)
    committed_early: torch.Tensor  # (N,) bool: an early-commit rule filled the window
    commit_step: torch.Tensor      # (N,) int64, 1-based step at which it committed; -1 where none
    commit_gap: torch.Tensor       # (N,) float32, the pooled gap G at commit; nan where none
    num_generated: torch.Tensor    # (N,) int64 tokens before the first EOS/EoT
    nonfinite: torch.Tensor        # (N,) bool: the model returned NaN/inf logits for this row
    decode_seconds: torch.Tensor   # (N,) float64 wall time from slot admission to finish
    forward_rows: int              # rows x forward passes actually computed (the cost)
    forward_tokens: torch.Tensor | None = None  # (N,) int64 positions the row sent through the model,
    #                                             all passes (a refresh or no-cache pass: its whole sequence)

    def __len__(self) -> int:
        return self.tokens.shape[0]
