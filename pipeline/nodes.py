"""A worker node lost mid-job: tell which one, in words a user can act on.

When a node disappears (a preempted VM, a SIGKILLed raylet), the actors on it go with it and Ray
Data stops the job with `ActorUnavailableError` or `ActorDiedError`: a Ray traceback that names an
actor id and a worker's ip:port, not the node. The driver remembers the nodes alive when the run
started; on such an error it asks the GCS which of them is gone (the GCS marks a node dead a few
seconds after its raylet stops answering, so it waits a little) and raises a `PipelineError`
naming the node's id, address and resources (as they were at the start: a dead node has none).
Ray Data's own report of the error (its full stack trace, and advice to file a Ray bug) is kept off
the console then; its log file (`<session>/logs/ray-data/`) still has it.
"""
from __future__ import annotations

import logging
import re
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

# what Ray raises when a node's actors, tasks or objects are gone with it
_NODE_LOSS_ERRORS = ("ActorUnavailableError", "ActorDiedError", "NodeDiedError", "OwnerDiedError",
                     "ObjectLostError", "WorkerCrashedError")
_IP = re.compile(r"\b(\d{1,3}(?:\.\d{1,3}){3})(?::\d+)?\b")
RERUN = "rerun the same command to finish the remaining rows (resume skips the finished parts)"


def alive_nodes(nodes: Iterable[dict]) -> dict[str, dict]:
    """The alive nodes of `ray.nodes()`'s list, by id."""
    return {n["NodeID"]: n for n in nodes if n.get("Alive")}


def largest_cpus(alive: dict[str, dict]) -> float | None:
    """CPUs of the biggest of the alive nodes (an actor must fit on one); None without nodes."""
    cpus = [n["Resources"].get("CPU", 0.0) for n in alive.values()]
    return max(cpus) if cpus else None


def node_loss_error(e: BaseException | None) -> BaseException | None:
    """The Ray error in `e`'s chain that a lost node causes (Ray Data re-raises it with a SystemException cause)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if any(c.__name__ in _NODE_LOSS_ERRORS for c in type(e).__mro__):
            return e
        cause = getattr(e, "cause", None)
        e = cause if isinstance(cause, BaseException) else (e.__cause__ or e.__context__)
    return None


def lost_nodes(alive_at_start: dict[str, dict], nodes: Iterable[dict], error_text: str = "") -> list[dict]:
    """Nodes alive at the start and dead now, as they were at the start; one whose address the error
    names comes first."""
    ips = set(_IP.findall(error_text))
    dead = [alive_at_start[n["NodeID"]] for n in nodes if n["NodeID"] in alive_at_start and not n.get("Alive")]
    return sorted(dead, key=lambda n: n.get("NodeManagerAddress") not in ips)


def describe(node: dict) -> str:
    """`node <id> at <address> (resources)`, the resources without Ray's per-node labels."""
    res = {k: v for k, v in (node.get("Resources") or {}).items()
           if not k.startswith("node:") and k not in ("memory", "object_store_memory")}
    shown = ", ".join(f"{k} {v:g}" for k, v in sorted(res.items()))
    addr = node.get("NodeManagerAddress", "?")
    port = node.get("NodeManagerPort")
    return f"node {node['NodeID']} at {addr}{f':{port}' if port else ''}" + (f" ({shown})" if shown else "")


def lost_node_message(error: BaseException, dead: list[dict]) -> str:
    """One paragraph: which node was lost, what it did to the run, what to do."""
    first = str(error).splitlines()[0] if str(error) else ""
    what = ("lost " + describe(dead[0]) if len(dead) == 1
            else f"lost {len(dead)} nodes: " + "; ".join(describe(n) for n in dead))
    # Ray's own words last: the manifest keeps the first 500 characters of a failure
    return (f"{what} mid-job: the actors on it are gone and the run stopped. The parts written so far are "
            f"complete and kept; {RERUN}; it runs on the nodes still alive once they hold the actor pool. "
            f"(Ray: {type(error).__name__}: {first[:240]})")


def wait_for_lost_nodes(alive_at_start: dict[str, dict], error_text: str, list_nodes: Callable[[], list[dict]],
                        wait_s: float = 30.0, poll_s: float = 1.0) -> list[dict]:
    """The nodes of the start that are dead, waiting up to `wait_s` for the GCS to notice (none: [])."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            dead = lost_nodes(alive_at_start, list_nodes(), error_text)
        except Exception:  # the GCS itself is gone (the head was lost): nothing to name
            return []
        if dead or time.monotonic() >= deadline:
            return dead
        time.sleep(poll_s)


def explain_node_loss(e: BaseException, alive_at_start: dict[str, dict], list_nodes: Callable[[], list[dict]],
                      wait_s: float = 30.0) -> str | None:
    """The lost-node message for `e`, or None when `e` is not a lost node's doing."""
    err = node_loss_error(e)
    if err is None or not alive_at_start:
        return None
    dead = wait_for_lost_nodes(alive_at_start, str(err), list_nodes, wait_s)
    return lost_node_message(err, dead) if dead else None


class _DropExplained(logging.Filter):
    """Drops a record logged while an error the driver explains itself is handled (its exc_info, or the
    exception in flight)."""

    def __init__(self, explained: Callable[[BaseException | None], bool]) -> None:
        super().__init__()
        self.explained = explained

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return not self.explained(exc)


@contextmanager
def quiet_ray_data_traces(explained: Callable[[BaseException | None], bool]) -> Iterator[None]:
    """Within the block, Ray Data's console report of an error that `explained` accepts is left out (its
    log file, `<session>/logs/ray-data/`, keeps it): the driver says what happened in one paragraph;
    any other error is shown as Ray Data shows it.

    The filter sits on Ray Data's console handlers (those with its HiddenRecordFilter), not on loggers: a
    logger's filters see only its own records, and the executor's modules are imported once it runs.
    """
    consoles = [h for h in logging.getLogger("ray.data").handlers
                if any(type(f).__name__ == "HiddenRecordFilter" for f in h.filters)]
    drop = _DropExplained(explained)
    for handler in consoles:
        handler.addFilter(drop)
    try:
        yield
    finally:
        for handler in consoles:
            handler.removeFilter(drop)


def quiet_node_loss_traces() -> Any:
    """quiet_ray_data_traces for a lost node's errors."""
    return quiet_ray_data_traces(lambda e: node_loss_error(e) is not None)


def nodes_now() -> list[dict[str, Any]]:
    """`ray.nodes()` (a function, so that tests can hand in their own list)."""
    import ray

    return ray.nodes()
