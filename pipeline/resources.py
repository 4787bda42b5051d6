"""Per-actor CPUs, GPUs and threads, decided from the config and the cluster (the job's and the stage's)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.config import JobConfig, JobConfigError

if TYPE_CHECKING:
    from pipeline.stage import StageConfig


@dataclass(frozen=True)
class Resources:
    """Per-actor resources decided from the config and the cluster."""

    cpus: float
    gpus: float
    threads: int


def resolve_resources(cfg: StageConfig | JobConfig, cluster: dict, node_cpus: float | None = None) -> Resources:
    """Per-actor CPUs/GPUs; on CPU, refuse a pool that would leave no CPU for read/write tasks.

    `node_cpus` (the largest node's CPUs) caps the default share, so an actor fits on one node.
    """
    ex = cfg.execution
    total = float(cluster.get("CPU", 0))
    if ex.gpus_per_actor > 0:
        cpus = ex.cpus_per_actor or 1.0
    else:
        # the deadlock trap: actors holding every logical CPU starve the read and write tasks
        share = max(total - 1, total / 2) / ex.actors
        cpus = ex.cpus_per_actor or math.floor(100 * min(share, node_cpus or share)) / 100
        if cpus <= 0 or ex.actors * cpus > total - 0.25:
            raise JobConfigError(f"execution: {ex.actors} actors x {cpus} CPUs leave no CPU of the cluster's "
                                 f"{total:g} for read/write tasks (the job would hang): lower "
                                 "execution.cpus_per_actor (fractions allowed) or execution.actors")
    return Resources(cpus=cpus, gpus=ex.gpus_per_actor, threads=max(1, round(cpus)))
