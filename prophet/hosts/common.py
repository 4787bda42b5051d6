"""What every host shares with the oracle: request checks, seeds, the starting canvas, result assembly."""
from __future__ import annotations

from typing import Sequence

import torch

from prophet.config import ConfigError, DecodeConfig
from prophet.rules import count_generated
from prophet.types import DLM, DecodeResult


def validate_request(model: DLM, prompts: Sequence[Sequence[int]], config: DecodeConfig) -> list[list[int]]:
    """Refuse, before any forward pass, what cannot be decoded; return the prompts as int lists."""
    if model.pad_id == model.mask_id:
        raise ConfigError(f"model.pad_id equals model.mask_id ({model.mask_id}): padding would read as masks; "
                          "give the adapter a pad id distinct from its mask id")
    vocab = model.vocab_size
    for t in config.anchor_ids:
        if not 0 <= t < vocab or t == model.mask_id:
            raise ConfigError(f"anchor_ids holds {t}, which is the mask id or outside the vocabulary [0, {vocab}): "
                              "encode the anchor text with this model's tokenizer")
    out = []
    for i, p in enumerate(prompts):
        ids = p.tolist() if isinstance(p, torch.Tensor) else [int(t) for t in p]
        if not ids:
            raise ConfigError(f"prompts[{i}] is empty: give every prompt at least one token")
        if len(ids) + config.gen_length > model.max_length:
            raise ConfigError(f"prompts[{i}] has {len(ids)} tokens; with gen_length={config.gen_length} that exceeds "
                              f"model.max_length={model.max_length}: shorten the prompt or lower gen_length")
        if min(ids) < 0 or max(ids) >= vocab:
            raise ConfigError(f"prompts[{i}] holds a token id outside the vocabulary [0, {vocab}): "
                              "encode it with this model's tokenizer")
        out.append(ids)
    return out


def resolve_seeds(n: int, generator: torch.Generator | None, seeds: Sequence[int] | None) -> list[int]:
    """One seed per row: `seeds` as given, else drawn from `generator`, else 0..n-1."""
    if seeds is not None:
        if len(seeds) != n:
            raise ConfigError(f"seeds has {len(seeds)} entries for {n} prompts: give one seed per prompt")
        return [int(s) for s in seeds]
    if generator is not None:
        return torch.randint(0, 2**62, (n,), generator=generator, device=generator.device).tolist()
    return list(range(n))


def initial_window(config: DecodeConfig, mask_id: int, device: torch.device) -> torch.Tensor:
    """(G,) the canvas a row starts from: all masks, with the anchor written at its offset."""
    window = torch.full((config.gen_length,), mask_id, dtype=torch.long, device=device)
    if config.anchor_ids:
        a = config.anchor_start
        window[a:a + len(config.anchor_ids)] = torch.tensor(config.anchor_ids, device=device)
    return window


def monitored_slice(config: DecodeConfig) -> slice:
    """Window positions of region 'anchor': answer_window positions one slot after the anchor."""
    lo = config.anchor_start + len(config.anchor_ids) + 1
    return slice(lo, lo + config.answer_window)


def stop_ids(model: DLM) -> tuple[int, ...]:
    """EOS and, where the model has one, end-of-turn."""
    return (model.eos_id,) if model.eot_id is None else (model.eos_id, model.eot_id)


def make_result(model: DLM, tokens: torch.Tensor, steps_used: torch.Tensor, committed_early: torch.Tensor,
                commit_step: torch.Tensor, commit_gap: torch.Tensor, nonfinite: torch.Tensor,
                decode_seconds: torch.Tensor, forward_rows: int, forward_tokens: torch.Tensor) -> DecodeResult:
    """Assemble the typed result (num_generated counted up to the first EOS/EoT)."""
    return DecodeResult(tokens=tokens, steps_used=steps_used, committed_early=committed_early,
                        commit_step=commit_step, commit_gap=commit_gap,
                        num_generated=count_generated(tokens, stop_ids(model)), nonfinite=nonfinite,
                        decode_seconds=decode_seconds, forward_rows=forward_rows, forward_tokens=forward_tokens)


def slot_order(kept: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Rows kept from a pass whose row i sits in cache slot i -> (order, src, dst): the new pass is
    old rows `order` (row j in slot j again), and only the rows that move (kept rows beyond the new
    size, into the holes left below it) copy their cache, src -> dst."""
    n = len(kept)
    stay = [i for i in kept if i < n]
    holes = sorted(set(range(n)) - set(stay))
    movers = [i for i in kept if i >= n]
    order = list(range(n))
    for h, m in zip(holes, movers):
        order[h] = m
    return order, movers, holes


def consecutive(slots: list[int]) -> int | None:
    """The first slot when `slots` are consecutive and ascending (the cache can be read in place), else None."""
    return slots[0] if slots and slots == list(range(slots[0], slots[0] + len(slots))) else None
