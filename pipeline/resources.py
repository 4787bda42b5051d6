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
    """Per-rank CPUs/GPUs (a replica of execution.tensor_parallel ranks per actor; one rank at 1); on CPU,
    refuse a pool that would leave no CPU for read/write tasks.

    `node_cpus` (the largest node's CPUs) caps the default share, so a replica fits on one node.
    """
    ex = cfg.execution
    ranks, tp = ex.actors * ex.tensor_parallel, ex.tensor_parallel
    total = float(cluster.get("CPU", 0))
    if ex.gpus_per_actor > 0:
        cpus = ex.cpus_per_actor or 1.0
    else:
        # the deadlock trap: actors holding every logical CPU starve the read and write tasks
        share = max(total - 1, total / 2) / ranks
        cpus = ex.cpus_per_actor or math.floor(100 * min(share, (node_cpus or share * tp) / tp)) / 100
        if cpus <= 0 or ranks * cpus > total - 0.25:
            who = f"{ex.actors} actors" + (f" x {tp} ranks" if tp > 1 else "")
            raise JobConfigError(f"execution: {who} x {cpus} CPUs leave no CPU of the cluster's "
                                 f"{total:g} for read/write tasks (the job would hang): lower "
                                 "execution.cpus_per_actor (fractions allowed) or execution.actors"
                                 + (" or tensor_parallel" if tp > 1 else ""))
    return Resources(cpus=cpus, gpus=ex.gpus_per_actor, threads=max(1, round(cpus)))


def check_replica_fits(cfg: StageConfig | JobConfig, res: Resources, alive: dict[str, dict],
                       can_grow: bool = False) -> str | None:
    """Refuse a replica of tensor_parallel ranks that no alive node (`pipeline.nodes.alive_nodes`) can hold:
    its ranks share one node (their collectives run every layer).

    can_grow: the cluster may add nodes (one the run joined, which an autoscaler may serve: cluster.yaml
    starts its GPU nodes on demand). Then nothing is refused; the message comes back for the log, and the
    placement groups' wait (actor_start_timeout_s) decides. None = a node holds a replica."""
    tp = cfg.execution.tensor_parallel
    if tp == 1 or not alive:
        return None
    need = {"CPU": tp * res.cpus, "GPU": tp * res.gpus}
    if any(all(n["Resources"].get(k, 0.0) >= v - 1e-9 for k, v in need.items()) for n in alive.values()):
        return None
    most = {k: max(n["Resources"].get(k, 0.0) for n in alive.values()) for k in need}
    field = "gpus_per_actor" if most["GPU"] < need["GPU"] else "cpus_per_actor"
    lacks = (f"a replica of {tp} ranks x {res.gpus:g} GPU(s) and {res.cpus:g} CPU(s) needs {need['GPU']:g} GPU(s) and "
             f"{need['CPU']:g} CPU(s) on one node; no node up now has that (at most {most['GPU']:g} GPU(s), "
             f"{most['CPU']:g} CPU(s))")
    if can_grow:
        return (f"{lacks}: waiting up to execution.actor_start_timeout_s={cfg.execution.actor_start_timeout_s}s "
                "for the cluster to add one")
    raise JobConfigError(f"execution.tensor_parallel: {lacks}: lower tensor_parallel or execution.{field}, or run on "
                         "a cluster with a node that holds a whole replica")
