"""The adapter that turns a native module and its tokenizer into a `prophet.types.TextDLM`."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from prophet.models.errors import ModelLoadError
from prophet.models.layers import CacheIndex, KVCache
from prophet.models.tokenizer import Tokenizer
from prophet.types import last_positions


def shift_logits_right(logits: torch.Tensor) -> torch.Tensor:
    """Dream's alignment: (B, L, V) -> (B, L, V) where position j gets the logit of j-1 (0 kept)."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


class NativeAdapter:
    """A native module (LLaDA, Dream, LLaDA2) behind the decoder's interface; owns ids, the shift and the template.

    `.module` is called as `module(input_ids, attention_mask, logits_to_keep=k)`, so the pipeline
    may replace it by a DeepSpeed inference engine wrapping the same module.
    """

    def __init__(self, module: nn.Module, tokenizer: Tokenizer, name: str | None = None) -> None:
        c = module.config
        self.module = module
        self.tokenizer = tokenizer
        self.family: str = c.family
        self.default_host: str = c.default_host
        self.shift: bool = c.shift_logits
        # attention block of a block-diffusion family; None = bidirectional (LLaDA, Dream)
        self.block_length: int | None = getattr(module, "block_length", None)
        self.query_lead: int = int(self.shift)  # a cached pass also runs the position before the first scored one
        self.name = name or c.family
        self.mask_id, self.pad_id, self.eos_id = c.mask_token_id, c.pad_token_id, c.eos_token_id
        self.eot_id: int | None = c.eot_token_id
        self.max_length: int = c.max_length
        self.vocab_size: int = c.logit_width
        param = next(module.parameters())
        self.device: torch.device = param.device
        self.dtype: torch.dtype = param.dtype
        if self.pad_id == self.mask_id:
            raise ModelLoadError(f"config.json: pad_token_id equals mask_token_id ({self.mask_id}); "
                                 "padding must be distinguishable from masks")

    @torch.no_grad()  # not inference_mode: the decoder edits the logits in place
    def logits(self, ids: torch.Tensor, attention_mask: torch.Tensor | None, last: int | None = None) -> torch.Tensor:
        """ids (B, L), attention_mask (B, L) bool or None (no padding) -> aligned (B, L, V) logits in the weights' dtype;
        `last`: the last `last` positions only (B, last, V), the LM head run on those alone."""
        L = ids.shape[1]
        keep = 0 if last is None or last + self.shift >= L else last + self.shift  # Dream: one more, then shift
        out = self.module(ids, attention_mask, logits_to_keep=keep)
        if self.shift:
            out = out[:, :-1] if keep else shift_logits_right(out)
        return last_positions(out, last)

    def setup_cache(self, slots: int, length: int) -> None:
        """Allocate keys/values for `slots` rows of up to `length` positions (prompt + window)."""
        self._raw().setup_cache(slots, length)

    def drop_cache(self) -> None:
        """Free the keys/values."""
        self._raw().drop_cache()

    def move_cache(self, src: list[int], dst: list[int]) -> None:
        """Copy the keys/values of slots src into slots dst (every layer), so that the decoder can keep
        its rows in consecutive slots as rows leave (attention then reads the cache in place)."""
        for m in self._raw().modules():
            if isinstance(m, KVCache):
                m.move(src, dst)

    @torch.no_grad()  # not inference_mode: the decoder edits the logits in place
    def block_logits(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor,
                     first_slot: int | None = None, scored: bool = True) -> torch.Tensor:
        """A cached pass of explicit positions (the block host): ids (B, Q) sit at `positions` (B, Q) of
        each row's own sequence (-1 = padding); their keys/values are written into slot slots[b], and
        each query attends to the slot's keys below lengths[b] that the model's attention allows
        (block-causal: its own block and earlier ones) -> logits (B, Q, V), or with scored=False
        (a pass that only stores keys/values) (B, 0, V) without running the LM head. A shifted family
        (query_lead 1: Dream's shift) takes, as the first column, the position before the first scored one
        and returns the aligned logits of the other columns (B, Q - 1, V): raw column j scores column j + 1."""
        keep = None if scored else torch.zeros(ids.shape[0], 0, dtype=torch.long, device=ids.device)
        out = self.module(ids, None, cache=CacheIndex(slots, positions, lengths, first_slot), keep=keep)
        return out[:, :-self.query_lead] if self.query_lead and scored else out

    @torch.no_grad()  # not inference_mode: the decoder edits the logits in place
    def cached_logits(self, ids: torch.Tensor, attention_mask: torch.Tensor, slots: torch.Tensor,
                      first: torch.Tensor, width: int, refresh: bool, first_slot: int | None = None) -> torch.Tensor:
        """Aligned logits (B, width, V) of columns first[b] .. first[b] + width - 1 of the left-padded batch.

        refresh: every real position runs and its keys/values are stored in the row's slot. Else only
        the scored columns run (one earlier for Dream's shift), their keys/values are written into
        the slot, and they attend to the slot's cached keys/values for everything else. Columns past
        the end of a row are padding (garbage logits). `first_slot`: slots are first_slot + arange(B)
        (the caller knows it without a sync), so attention reads the cache in place.
        """
        B, L = ids.shape
        lengths = attention_mask.sum(1)                                   # (B,) real positions
        pad = (L - lengths)[:, None]                                      # (B, 1) left padding
        cols = first[:, None] - self.query_lead + torch.arange(width + self.query_lead, device=ids.device)
        if refresh:
            qcols = torch.arange(L, device=ids.device).expand(B, -1)      # (B, L): the whole sequence
            keep = cols[:, :width].clamp(max=L - 1)                       # (B, W) columns whose output scores
        else:
            qcols, keep = cols, torch.arange(width, device=ids.device).expand(B, -1)  # (B, W + lead)
        real = (qcols < L) & attention_mask.gather(1, qcols.clamp(max=L - 1))
        qids = torch.where(real, ids.gather(1, qcols.clamp(max=L - 1)), self.pad_id)
        index = CacheIndex(slots, torch.where(real, qcols - pad, -1), lengths, first_slot)
        return self.module(qids, None, cache=index, keep=keep)            # (B, W, V)

    def _raw(self) -> nn.Module:
        """The native module, also when the pipeline has wrapped it in an inference engine."""
        m = self.module
        return m if hasattr(m, "setup_cache") else m.module

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids (no specials added, no template)."""
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text, stopping at nothing."""
        return self.tokenizer.decode(ids)

    def render_chat(self, messages: Sequence[dict]) -> str:
        """Chat messages -> prompt text through the tokenizer's template, generation prompt added."""
        return self.tokenizer.render_chat(messages)

    def __repr__(self) -> str:
        return (f"NativeAdapter(name={self.name!r}, family={self.family!r}, device={self.device}, "
                f"dtype={self.dtype}, vocab_size={self.vocab_size})")
