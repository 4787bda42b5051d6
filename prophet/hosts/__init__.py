"""Hosts: how the rows of a decode call move through the forward pass (one small object each).

A host gives the decode loop (`prophet.decode`) one batch object per call, with `admit`, `step`
and `keep`; the loop knows no host. `llada` and `dream` score the whole window each step
(`prophet.hosts.window`); `block` decodes block-causal models one block at a time on an exact
KV cache (`prophet.hosts.block`).
"""
from __future__ import annotations

from prophet.config import DecodeConfig
from prophet.hosts.block import BlockHost
from prophet.hosts.dream import DreamHost
from prophet.hosts.llada import LLaDAHost

HOSTS = {"llada": LLaDAHost, "dream": DreamHost, "block": BlockHost}


def host_for(config: DecodeConfig):
    """The host object that runs `config.host`."""
    return HOSTS[config.host]()
