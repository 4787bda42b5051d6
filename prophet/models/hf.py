"""A generic adapter for any local transformers masked LM (AutoModelForMaskedLM) directory.

transformers is imported inside the functions: `import prophet.models` must not pay for it.
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from prophet.models.errors import ModelLoadError
from prophet.models.layers import position_ids
from prophet.types import last_positions

PINNED_REVISION = re.compile(r"[0-9a-f]{40}")


def is_masked_lm_config(raw: dict, trust_remote_code: bool = False) -> bool:
    """Whether a config.json dict maps to an AutoModelForMaskedLM architecture."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
    except ImportError:
        return False
    if raw.get("model_type") in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return True
    return trust_remote_code and "AutoModelForMaskedLM" in (raw.get("auto_map") or {})


def check_remote_code(trust_remote_code: bool, revision: str | None) -> None:
    """Remote code runs only when pinned to a full commit hash, so the code cannot change under you."""
    if trust_remote_code and not (revision and PINNED_REVISION.fullmatch(revision)):
        raise ModelLoadError("trust_remote_code=True needs revision= a full 40-hex commit hash, so that "
                             f"the code that runs is pinned (got revision={revision!r})")


def load_masked_lm(path: Path, device: str | torch.device, dtype: torch.dtype, *,
                   trust_remote_code: bool = False, revision: str | None = None) -> "HFMaskedLMAdapter":
    """AutoModelForMaskedLM + AutoTokenizer from a local directory (no hub access)."""
    check_remote_code(trust_remote_code, revision)
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    kw: dict[str, Any] = {"local_files_only": True, "trust_remote_code": trust_remote_code, "revision": revision}
    tokenizer = AutoTokenizer.from_pretrained(str(path), **kw)
    model = AutoModelForMaskedLM.from_pretrained(str(path), dtype=dtype, **kw)
    return HFMaskedLMAdapter(model.to(device).eval(), tokenizer,
                             name=getattr(model.config, "_name_or_path", "") or path.resolve().name)


def _position_offset(model: torch.nn.Module) -> int | None:
    """Offset of the first real position, or None where the model takes no position_ids.

    BERT-style embeddings start at 0; RoBERTa-style ones reserve padding_idx + 1 slots.
    """
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return None
    emb = getattr(getattr(model.base_model, "embeddings", None), "position_embeddings", None)
    pad = getattr(emb, "padding_idx", None)
    return 0 if pad is None else pad + 1


class HFMaskedLMAdapter:
    """A transformers masked LM behind the decoder's interface: no shift, ids from its tokenizer."""

    family = "hf-mlm"
    default_host = "llada"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, name: str) -> None:
        self.module, self.tokenizer, self.name = model, tokenizer, name
        if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
            raise ModelLoadError(f"{name}: the tokenizer needs a mask token and a pad token")
        self.mask_id: int = tokenizer.mask_token_id
        self.pad_id: int = tokenizer.pad_token_id
        if self.pad_id == self.mask_id:
            raise ModelLoadError(f"{name}: pad token id equals mask token id ({self.mask_id})")
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        self.eos_id: int = eos if eos is not None else self.pad_id
        self.eot_id: int | None = None
        self.max_length: int = getattr(model.config, "max_position_embeddings", None) or 512
        self.vocab_size: int = model.get_output_embeddings().weight.shape[0]
        self.device: torch.device = next(model.parameters()).device
        self.dtype: torch.dtype = next(model.parameters()).dtype
        self._offset = _position_offset(model)

    @torch.no_grad()  # not inference_mode: the decoder edits the logits in place
    def logits(self, ids: torch.Tensor, attention_mask: torch.Tensor | None, last: int | None = None) -> torch.Tensor:
        """ids (B, L), attention_mask (B, L) bool or None (no padding) -> (B, L, V) (or the last `last` positions);
        positions restart at each row's first token. Masked-LM heads offer no way to score only
        the tail, so every position is scored and then sliced."""
        if attention_mask is None:  # the decoder's "no padding in this batch"
            attention_mask = torch.ones_like(ids, dtype=torch.bool)
        kw = {} if self._offset is None else {"position_ids": position_ids(attention_mask) + self._offset}
        out = self.module(input_ids=ids, attention_mask=attention_mask.long(), **kw).logits
        return last_positions(out, last)

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids, no special tokens added."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text, stopping at nothing."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def render_chat(self, messages: Sequence[dict]) -> str:
        """Chat messages -> prompt text through the tokenizer's own template."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.name}: the tokenizer has no chat template: pass a plain text prompt")
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
