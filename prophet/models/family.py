"""What every native family config shares: reading and writing a Hugging Face style config.json."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeVar

from prophet.models.errors import ModelLoadError

C = TypeVar("C", bound="FamilyConfig")


class FamilyConfig:
    """Mixin for the family config dataclasses; the class variables describe the family."""

    family: ClassVar[str]                 # adapter family name ("llada", "dream")
    model_type: ClassVar[str]             # config.json "model_type" written and recognised
    architectures: ClassVar[tuple[str, ...]]  # config.json "architectures" written and recognised
    default_host: ClassVar[str]           # decode schedule that suits the family
    shift_logits: ClassVar[bool]          # logits at j-1 predict token j (Dream)
    # config.json keys for features this implementation does not have, with the values that
    # mean "feature off"; any other value is refused rather than silently computed wrong.
    required_values: ClassVar[dict[str, tuple[Any, ...]]] = {}
    # config.json keys whose absence means the reference config class's default, where that
    # differs from the dataclass default (the dataclass defaults describe the flagship checkpoint).
    # A required_values key listed here with an unsupported default is refused when absent.
    reference_defaults: ClassVar[dict[str, Any]] = {}
    # architectures of the same model_type that this implementation does not have, and why.
    other_architectures: ClassVar[dict[str, str]] = {}
    # keys written to config.json for fidelity with the published files; never read back.
    written_constants: ClassVar[dict[str, Any]] = {}

    @property
    def attention_block(self) -> int | None:
        """Block of a block-diffusion family's block-causal attention (config.json's or the family's);
        None = bidirectional."""
        return None

    @classmethod
    def matches(cls, raw: dict) -> bool:
        """Whether a config.json dict names this family: its architectures when listed (one model_type
        covers several, e.g. "llada" is dense LLaDA and LLaDA-MoE), else its model_type.

        A listed architecture of this model_type that is not implemented is refused by name, so that
        no other module's weights are ever loaded into this one.
        """
        listed = raw.get("architectures") or []
        if any(a in cls.architectures for a in listed):
            return True
        if str(raw.get("model_type", "")).lower() != cls.model_type.lower():
            return False
        if listed:
            arch = listed[0]
            why = cls.other_architectures.get(arch, "not implemented natively")
            raise ModelLoadError(f"config.json: architecture {arch} (model_type {raw.get('model_type')!r}) "
                                 f"is not supported: {why}. Supported {cls.family} architectures: "
                                 f"{', '.join(cls.architectures)}")
        return True

    @classmethod
    def from_dict(cls: type[C], raw: dict) -> C:
        """Build from a config.json dict: known fields are read, the rest ignored, nulls mean default."""
        for key, allowed in cls.required_values.items():
            if key in raw and raw[key] not in allowed:
                raise ModelLoadError(f"config.json: {key}={raw[key]!r} is not supported by the native "
                                     f"{cls.family} implementation (supported: {list(allowed)})")
        for key, allowed in cls.required_values.items():  # absent: what the reference class means
            if key not in raw and cls.reference_defaults.get(key, allowed[0]) not in allowed:
                raise ModelLoadError(
                    f"config.json has no {key!r}: {cls.family}'s reference config class then means "
                    f"{cls.reference_defaults[key]!r}, which the native implementation does not support "
                    f"(supported: {list(allowed)}); write the checkpoint's value into config.json")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        given = {k: v for k, v in raw.items() if k in names and v is not None}
        defaults = {k: v for k, v in cls.reference_defaults.items() if k in names}
        config = cls(**{**defaults, **given})
        check_token_ids(config, given)
        return config

    def to_dict(self) -> dict:
        """config.json dict in the published family's own keys."""
        return {"model_type": self.model_type, "architectures": list(self.architectures),
                **self.written_constants, **dataclasses.asdict(self)}  # type: ignore[call-overload]


# ids the decoder feeds to the model (pad, mask; EOS fills a finished window), so they must have an embedding row
TOKEN_ID_KEYS = ("mask_token_id", "pad_token_id", "eos_token_id")
# ids only compared with (end of turn) or not used by the decoder: checked where config.json gives them; absent,
# they are the flagship tokenizer's, which a small vocabulary (LLaDA's reference config, 50k) need not hold
GIVEN_ID_KEYS = ("eot_token_id", "bos_token_id")


def check_token_ids(config: Any, given: dict) -> None:
    """Refuse a special token id outside the embedding (config.json pad_token_id 999 in a 102-token model):
    every padded batch would fail with an index error and fall back to row-by-row decoding."""
    width = config.logit_width
    for key in TOKEN_ID_KEYS + tuple(k for k in GIVEN_ID_KEYS if k in given):
        value = getattr(config, key, None)
        if value is None or 0 <= int(value) < width:
            continue
        where = (f"config.json: {key} {value}" if key in given
                 else f"config.json has no {key}, and the {config.family} default {value}")
        raise ModelLoadError(f"{where} is outside the vocabulary (ids 0..{width - 1}, the embedding's rows): "
                             f"set {key} in config.json to the id of that token in this model's tokenizer "
                             "(tokenizer.json / tokenizer_config.json)")


class TransformersSizes:
    """logit_width, max_length and head_counts of a config in transformers' key names (Dream, LLaDA2, SDAR, ...)."""

    vocab_size: int
    max_position_embeddings: int

    @property
    def logit_width(self) -> int:
        """Width of the logits (vocab_size rows of lm_head)."""
        return self.vocab_size

    @property
    def max_length(self) -> int:
        """Longest prompt + generation: max_position_embeddings. A config.json "max_length" is a
        generation default of transformers (e.g. 20), never the context, so it is not read."""
        return self.max_position_embeddings

    @property
    def head_counts(self) -> tuple[int, int]:
        """(attention heads, KV heads): what a tensor-parallel size must divide."""
        return int(self.num_attention_heads), int(self.num_key_value_heads)  # type: ignore[attr-defined]

    @property
    def head_width(self) -> int:
        """Dims per attention head: the grain tensor parallelism splits widths in."""
        return int(getattr(self, "head_dim", None) or self.hidden_size // self.num_attention_heads)  # type: ignore

    tp_split_widths: ClassVar[dict[str, int]] = {}  # widths a tensor-parallel size x head_width must divide


def check_heads(width: int, n_heads: int, n_kv_heads: int) -> None:
    """Refuse head counts that do not divide the width (or the query heads, for KV heads)."""
    if width % n_heads or n_heads % n_kv_heads:
        raise ModelLoadError(f"config.json: width {width} must be divisible by heads {n_heads}, "
                             f"and heads by kv heads {n_kv_heads}")
