"""Fast batched decoding with continuous batching (SPEC sections 1-3, 8): the host-agnostic loop.

`config.batch_size` slots share one forward pass per step. Each row carries its own state; a row
that finishes leaves the pass and a waiting prompt takes its slot. With `config.continuous=False`
finished rows stay frozen in the pass until their whole batch is done (the benchmark's baseline);
results are identical either way. What a step does is the host's (`prophet.hosts`: LLaDA and
Dream in `prophet.hosts.window`, block diffusion in `prophet.hosts.block`); the cases SPEC leaves
open are decided in those modules' docstrings.
"""
from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from prophet.config import ConfigError, DecodeConfig
from prophet.hosts import HostBatch, host_for
from prophet.hosts.common import (initial_window, make_result, monitored_slice, resolve_seeds, stop_ids,
                                  validate_request)
from prophet.hosts.window import span_lower, step_span
from prophet.types import DLM, CachedDLM, DecodeResult

__all__ = ["decode", "kv_cache", "initial_window", "make_result", "monitored_slice", "resolve_seeds", "span_lower",
           "step_span", "stop_ids", "validate_request"]

RESULT_FIELDS = ("used", "early", "cstep", "cgap", "bad", "ftok")  # per-row state a batch keeps in `t`


class _Outputs:
    """Per-row results, filled as rows finish."""

    def __init__(self, n: int, gen_length: int, device: torch.device) -> None:
        self.tokens = torch.zeros(n, gen_length, dtype=torch.long, device=device)
        self.state: dict[str, torch.Tensor] = {}
        self.seconds = torch.zeros(n, dtype=torch.float64)

    def record(self, batch: HostBatch, idx: list[int], now: float) -> None:
        """Copy the finished batch rows idx into their input positions."""
        ix = torch.tensor(idx, dtype=torch.long, device=batch.device)
        rows = torch.tensor([batch.slots[i].row for i in idx], dtype=torch.long, device=batch.device)
        G = self.tokens.shape[1]
        self.tokens.index_copy_(0, rows, batch.t["canvas"].index_select(0, ix)[:, :G])
        for k in RESULT_FIELDS:
            v = batch.t[k].index_select(0, ix)
            if k not in self.state:
                self.state[k] = v.new_zeros((self.tokens.shape[0],))
            self.state[k].index_copy_(0, rows, v)
        for i in idx:
            self.seconds[batch.slots[i].row] = now - batch.slots[i].t0

    def field(self, k: str, dtype: torch.dtype) -> torch.Tensor:
        """One per-row field (zeros of `dtype` when no row was decoded)."""
        return self.state.get(k, torch.zeros(self.tokens.shape[0], dtype=dtype, device=self.tokens.device))


@torch.no_grad()
def decode(model: DLM, prompts: Sequence[Sequence[int]], config: DecodeConfig,
           generator: torch.Generator | None = None, seeds: Sequence[int] | None = None) -> DecodeResult:
    """Decode every prompt with continuous batching; rows come back in input order."""
    host = host_for(config)
    config = host.prepare(model, config)
    prompts = validate_request(model, prompts, config)
    seeds = resolve_seeds(len(prompts), generator, seeds)
    device = torch.device(model.device)
    out = _Outputs(len(prompts), config.gen_length, device)
    batch = host.batch(model, config, device)
    waiting = deque(range(len(prompts)))
    forward_rows = 0
    with kv_cache(model, config, host.cache_rows(config, prompts) if prompts else None):
        while waiting or batch.slots:
            if config.continuous or not batch.slots:
                _admit(batch, config, waiting, prompts, seeds)
            forward_rows += batch.passes * len(batch.slots)
            finished = _step(model, batch)
            _retire(batch, finished, out, config.continuous)
    f = out.field
    return make_result(model, out.tokens, f("used", torch.long), f("early", torch.bool), f("cstep", torch.long),
                       f("cgap", torch.float32).float(), f("bad", torch.bool), out.seconds, forward_rows,
                       f("ftok", torch.long))


def _step(model: DLM, batch: HostBatch) -> list[bool]:
    """One step of the batch (the host's); per row, whether it finished. One host read."""
    return batch.step(model)


@contextmanager
def kv_cache(model: DLM, config: DecodeConfig, rows: tuple[int, int] | None) -> Iterator[None]:
    """The model's keys/values for `rows` = (slots, positions), freed on exit; nothing for None.
    Memory is bounded by the slots, not by the number of prompts."""
    if rows is None:
        yield
        return
    if not isinstance(model, CachedDLM):
        raise ConfigError(f"cache={config.cache!r} (host {config.host!r}): this model "
                          f"({getattr(model, 'family', type(model).__name__)}) keeps no keys/values between steps; "
                          "use cache='none' with a bidirectional host")
    model.setup_cache(*rows)
    try:
        yield
    finally:
        model.drop_cache()


def _admit(batch: HostBatch, config: DecodeConfig, waiting: deque, prompts: list[list[int]],
           seeds: list[int]) -> None:
    """Fill free slots with waiting prompts."""
    n_free = min(config.batch_size - len(batch.slots), len(waiting))
    if n_free > 0:
        rows = [waiting.popleft() for _ in range(n_free)]
        batch.admit([(r, seeds[r], prompts[r]) for r in rows], time.perf_counter())


def _retire(batch: HostBatch, finished: list[bool], out: _Outputs, continuous: bool) -> None:
    """Record finished rows; drop them (continuous) or leave them frozen until the batch is done."""
    now = time.perf_counter()
    done = [i for i, fin in enumerate(finished) if fin]
    if done:
        out.record(batch, done, now)
    for s, fin in zip(batch.slots, finished):
        s.done = s.done or fin
    if continuous:
        if done:
            batch.keep([i for i, s in enumerate(batch.slots) if not s.done])
    elif all(s.done for s in batch.slots):
        batch.keep([])
