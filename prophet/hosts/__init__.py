"""Hosts: how the rows of a decode call move through the forward pass (one small object each).

A host gives the decode loop (`prophet.decode`) one batch object per call, with `admit`, `step`
and `keep`; the loop knows no host. `llada` and `dream` score the whole window each step
(`prophet.hosts.window`); `block` decodes block-causal models one block at a time on an exact
KV cache (`prophet.hosts.block`).
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch

from prophet.config import DecodeConfig
from prophet.hosts.block import BlockHost
from prophet.hosts.dream import DreamHost
from prophet.hosts.llada import LLaDAHost

from prophet.types import DLM


class HostSlot(Protocol):
    """What the loop reads of a row in the pass."""

    row: int      # index in the input
    t0: float     # admission time
    done: bool    # finished (frozen in the pass when batching is static)


class HostBatch(Protocol):
    """The rows of one decode call's forward pass, as the loop drives them."""

    slots: Sequence[HostSlot]
    t: dict[str, torch.Tensor]  # per-row state; the loop reads canvas, used, early, cstep, cgap, bad, ftok
    passes: int                 # forward rows per row (2 with classifier-free guidance)
    device: torch.device

    def admit(self, rows: list[tuple[int, int, list[int]]], now: float) -> None:
        """Append waiting prompts (row index, seed, ids)."""
        ...

    def step(self, model: DLM) -> list[bool]:
        """One step of every live row -> per row, whether it finished now (one host read)."""
        ...

    def keep(self, idx: list[int]) -> None:
        """Keep only the rows at idx."""
        ...


class Host(Protocol):
    """A decode schedule: what it needs of the model and how its rows move through the pass."""

    name: str

    def prepare(self, model: DLM, config: DecodeConfig) -> DecodeConfig:
        """The config as this host runs it on this model (model-dependent defaults resolved, refusals)."""
        ...

    def cache_rows(self, config: DecodeConfig, prompts: list[list[int]]) -> tuple[int, int] | None:
        """(slots, positions) of keys/values the model keeps, or None."""
        ...

    def batch(self, model: DLM, config: DecodeConfig, device: torch.device) -> HostBatch:
        """An empty pass for one decode call."""
        ...


HOSTS: dict[str, type] = {"llada": LLaDAHost, "dream": DreamHost, "block": BlockHost}


def host_for(config: DecodeConfig) -> Host:
    """The host object that runs `config.host`."""
    return HOSTS[config.host]()
