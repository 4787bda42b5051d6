"""A replica of N ranks: one model sharded over N Ray actors on one node (execution.tensor_parallel).

Ray Data's actor pool knows one actor per replica, rank 0 (`pipeline.actor.GenerateActor`). With
tensor_parallel N > 1 the driver reserves, per pool actor, a placement group of N bundles packed on
one node (`ReplicaGroups`, what `ray.data.llm` does for a vLLM engine's workers); rank 0 runs in
bundle 0 and starts ranks 1..N-1 (`RankActor`) in the others. Rank 0 hosts the process group's
store on its node's address; every rank joins (gloo on CPU, NCCL on GPUs), loads the model and
hands it to DeepSpeed (`pipeline.parallel`), which shards it over the group.

Lockstep (`Replica.decode`): rank 0 sends each batch's prompt ids and seeds to the other ranks, runs
the same `prophet.decode.decode` itself (the collectives inside the forward keep the ranks in step,
and every rank sees the same logits, so every rank makes the same choices), then checks that every
rank produced the same tokens. The decode loop knows nothing of this.

A lost rank (killed, or silent past execution.rank_timeout_s) loses the replica: the process group cannot be
repaired. Rank 0 records why in the run's named `RestartCounter` and exits its process; Ray restarts
it (execution.max_restarts), its ranks die with it (Ray actors share their owner's fate), the
restarted rank 0 starts fresh ones, and Ray Data retries the batch (execution.max_task_retries).
Nothing of that batch was written, so nothing is written twice.
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from pipeline.actor import ActorSpec


@dataclass(frozen=True)
class ReplicaSpec:
    """What rank 0 needs to build its replica (ActorSpec.replica; None = tensor_parallel 1)."""

    size: int                        # ranks (execution.tensor_parallel)
    cpus: float                      # per rank
    gpus: float                      # per rank
    start_timeout_s: float           # for the other ranks to be scheduled and load the model
    timeout_s: float = 300           # a rank's wait for the others in one collective (execution.rank_timeout_s)
    counter: str | None = None       # name of the run's RestartCounter Ray actor, where there is one


def check_tensor_parallel(cfg: Any) -> None:
    """Refuse a tensor_parallel the model or the engine cannot take (config.json read, no weights);
    JobConfigError names the field and the fix. `cfg`: a JobConfig or a StageConfig."""
    from pathlib import Path

    from pipeline.config import JobConfigError
    from prophet.models import ModelLoadError
    from prophet.models.loading import native_family, read_config

    ex, tp = cfg.execution, cfg.execution.tensor_parallel
    if tp == 1:
        return
    if cfg.model.engine != "deepspeed":
        raise JobConfigError(f"model.engine: '{cfg.model.engine}' with execution.tensor_parallel {tp}: DeepSpeed "
                             "shards the model over the ranks; set model.engine: deepspeed, or tensor_parallel: 1")
    if ex.gpus_per_actor and ex.gpus_per_actor != 1:
        raise JobConfigError(f"execution.gpus_per_actor: {ex.gpus_per_actor:g} with execution.tensor_parallel {tp}: "
                             "each rank drives exactly one GPU of its own (NCCL takes one device per rank; more "
                             "would sit idle); set gpus_per_actor: 1 and tensor_parallel to the GPUs per replica")
    if "://" in cfg.model.dir:
        return  # read by the actors; a model they cannot shard fails there
    try:
        raw = read_config(Path(cfg.model.dir))
        family = native_family(raw)
        config = family[0].from_dict(raw) if family else None
    except ModelLoadError as e:
        raise JobConfigError(f"model.dir: {e}") from None
    if config is None:
        raise JobConfigError(f"execution.tensor_parallel: {tp}, but {cfg.model.dir} is a transformers masked LM, "
                             "which DeepSpeed cannot shard here (only the native families: LLaDA, Dream, LLaDA2, "
                             "SDAR, ...); set execution.tensor_parallel: 1 and add replicas with execution.actors")
    heads, kv = config.head_counts
    for name, width in config.tp_split_widths.items():
        if width % (tp * config.head_width):
            raise JobConfigError(f"execution.tensor_parallel: {tp} x the model's head_dim {config.head_width} does not "
                                 f"divide its {name} {width} (config.json): AutoTP would cut that layer's projections "
                                 "into unequal shares; set tensor_parallel to a size that divides it")
    if heads % tp or kv % tp:
        fits = [n for n in range(2, kv + 1) if heads % n == 0 and kv % n == 0]
        fix = f"one of {fits}" if fits else "1 (no larger size divides both)"
        raise JobConfigError(f"execution.tensor_parallel: {tp} does not divide the model's {heads} attention heads "
                             f"and {kv} KV heads (config.json; each rank holds whole heads): set it to {fix}")


class ReplicaLost(RuntimeError):
    """A rank of the replica died or hung: its process group cannot go on, the replica restarts."""


class RestartCounter:
    """Counts replicas that lost a rank and restarted, with the first reason (a named Ray actor per run,
    like pipeline.actor.FallbackCounter; plain class: the driver wraps it with `ray.remote`)."""

    def __init__(self) -> None:
        self.restarts = 0
        self.restarted = 0  # rank 0 processes Ray restarted, whether or not the one before said why
        self.first_reason: str | None = None

    def record(self, reason: str) -> None:
        """One replica restarted, for `reason`."""
        self.restarts += 1
        if self.first_reason is None:
            self.first_reason = reason

    def record_restarted(self) -> None:
        """Rank 0 came back after its process ended: counted even where the process could not say why
        (killed itself, or aborted by NCCL's watchdog on a peer that died: NCCL reports no error)."""
        self.restarted += 1

    def report(self) -> dict:
        """{'restarts', 'first_reason'}: the summary's and the manifest's replica_restarts."""
        restarts = max(self.restarts, self.restarted)
        reason = self.first_reason or (restarts and "rank 0's process ended without a reason (killed, or NCCL's "
                                       "watchdog on a lost peer)") or None
        return {"restarts": restarts, "first_reason": reason}


def rank_bundle(cpus: float, gpus: float) -> dict[str, float]:
    """One rank's share of a replica's placement group."""
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}


class ReplicaGroups:
    """The driver's placement groups, one per pool actor, each N rank bundles packed on one node.

    `strategy()` is the `ray_remote_args_fn` of the decode stage's map_batches: Ray Data calls it once
    per actor it starts, and each actor gets a group of its own (a restarted actor keeps its group).
    """

    def __init__(self, tp: int, cpus: float, gpus: float) -> None:
        self.bundles = [rank_bundle(cpus, gpus)] * tp
        self.groups: list[Any] = []
        self.handed_out = 0

    def __deepcopy__(self, memo: dict) -> "ReplicaGroups":
        # Ray Data may copy its plan's arguments: every copy must hand out (and release) the same groups
        return self

    def reserve(self, count: int, timeout_s: float) -> bool:
        """Create `count` groups and wait until the cluster holds them all; False past timeout_s."""
        import ray
        from ray.util.placement_group import placement_group

        while len(self.groups) < count:
            self.groups.append(placement_group(self.bundles, strategy="STRICT_PACK"))
        ready = [g.ready() for g in self.groups]
        done, _ = ray.wait(ready, num_returns=len(ready), timeout=timeout_s)
        return len(done) == len(ready)

    def strategy(self) -> dict:
        """Remote args that put the next actor into bundle 0 of a group of its own."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if self.handed_out == len(self.groups):
            self.groups.append(placement_group(self.bundles, strategy="STRICT_PACK"))
        group = self.groups[self.handed_out]
        self.handed_out += 1
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)}

    def release(self) -> None:
        """Remove every group (their actors end with them); the run calls this whatever happened."""
        from ray.util.placement_group import remove_placement_group

        for group in self.groups:
            try:
                remove_placement_group(group)
            except Exception:
                pass  # already gone with the cluster
        self.groups, self.handed_out = [], 0


def join_group(rank: int, rep: ReplicaSpec, address: str, port: int, device: str, store: Any = None) -> None:
    """Join the replica's torch.distributed group through rank 0's store (rank 0 passes its own store)."""
    from pipeline.parallel import init_rank

    # LOCAL_RANK 0: Ray shows each rank its one GPU
    init_rank(rank, rep.size, address, port, "nccl" if device == "cuda" else "gloo", rep.timeout_s, store,
              local_rank=0)


class RankActor:
    """Rank 1..N-1 of a replica: the model loaded, sharded with rank 0's group, decoding what rank 0 sends."""

    def __init__(self, spec: ActorSpec, rank: int) -> None:
        from pipeline.actor import load_engine

        self.spec, self.rank = spec, rank
        self.model, self.config, self.dtype = load_engine(spec)

    def ready(self) -> bool:
        """True once the model is loaded (Ray runs this after __init__)."""
        return True

    def join(self, address: str, port: int) -> int:
        """Join the process group and shard the model (every rank at once); returns the rank's parameter count."""
        from pipeline.actor import wrap_with_deepspeed

        join_group(self.rank, self.spec.replica, address, port, self.spec.device)
        wrap_with_deepspeed(self.model, self.dtype, self.spec.replica.size)
        return sum(p.numel() for p in self.model.module.parameters())

    def decode(self, prompts: list[list[int]], seeds: list[int]) -> tuple[list, list]:
        """The same decode as rank 0's; (tokens, num_generated) for rank 0 to compare."""
        from prophet.decode import decode

        res = decode(self.model, prompts, self.config, seeds=seeds)
        return res.tokens.tolist(), res.num_generated.tolist()


def exit_process(reason: str) -> None:
    """Leave now (no cleanup: the process group is broken), so that Ray restarts the actor."""
    print(f"prophet-dlm: replica lost, restarting: {reason}", file=sys.stderr, flush=True)
    os._exit(1)


class Replica:
    """Rank 0's side of a replica: starts ranks 1..N-1 in its placement group and decodes in lockstep."""

    def __init__(self, spec: ActorSpec, model: Any, config: Any, dtype: Any,
                 on_loss: Callable[[str], None] = exit_process) -> None:
        self.spec, self.model, self.config, self.on_loss = spec, model, config, on_loss
        self._count_restart()
        try:
            # params: the parameters each rank holds after sharding, rank 0 first (about 1/N of the model's each)
            self.ranks, self.params = self._start(dtype)
        except ReplicaLost as e:
            self._lost(e)
            return
        print(f"prophet-dlm: replica of {len(self.params)} ranks ready; parameters per rank: "
              + ", ".join(f"{p / 1e6:.1f}M" for p in self.params), file=sys.stderr, flush=True)

    def _start(self, dtype: Any) -> tuple[list[Any], list[int]]:
        """Start the other ranks, wait until they hold the model, then join the group all at once and shard."""
        import ray
        import torch.distributed as dist
        from ray.util import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from pipeline.actor import wrap_with_deepspeed

        spec, rep = self.spec, self.spec.replica
        tp = rep.size
        group = get_current_placement_group()
        if group is None:
            raise RuntimeError(f"tensor_parallel {tp}: rank 0 runs outside a placement group; the decode stage "
                               "reserves one per actor (pipeline.replica.ReplicaGroups)")
        remote = ray.remote(RankActor)
        gpus = {"num_gpus": rep.gpus} if rep.gpus else {}
        ranks = [remote.options(num_cpus=rep.cpus, **gpus, max_restarts=0, max_task_retries=0,
                                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=r))
                 .remote(spec, r) for r in range(1, tp)]
        self._wait([r.ready.remote() for r in ranks], rep.start_timeout_s, "start")
        address = ray.util.get_node_ip_address()
        store = dist.TCPStore(address, 0, tp, is_master=True, timeout=timedelta(seconds=rep.timeout_s),
                              wait_for_workers=False)
        joined = [r.join.remote(address, store.port) for r in ranks]
        try:
            join_group(0, rep, address, store.port, spec.device, store)
            wrap_with_deepspeed(self.model, dtype, tp)
        except Exception:
            # a rank lost on the way is the reason (ReplicaLost: the replica restarts); otherwise rank 0's
            # own error (a model AutoTP cannot shard, NCCL that cannot start) fails the actor for good,
            # rather than restarting into the same error max_restarts times
            self._wait(joined, rep.timeout_s, "join")
            raise
        answers = self._wait(joined, rep.timeout_s, "join")
        for rank, answer in enumerate(answers, start=1):
            if isinstance(answer, BaseException):
                raise RuntimeError(f"rank {rank} of the replica failed to join and shard the model: "
                                   f"{_first_line(answer)}")
        mine = sum(p.numel() for p in self.model.module.parameters())
        return ranks, [mine, *answers]

    def _wait(self, refs: list[Any], timeout_s: float, what: str) -> list[Any]:
        """The ranks' answers; ReplicaLost for a rank that died or did not answer within timeout_s.
        A rank's own exception comes back as the exception (rank 0 decides what it means)."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        answers: list[Any] = []
        for rank, ref in enumerate(refs, start=1):
            if ref not in done:
                raise ReplicaLost(f"rank {rank} did not {what} within {timeout_s:g}s")
            try:
                answers.append(ray.get(ref))
            except RayActorError as e:
                raise ReplicaLost(f"rank {rank} died during {what}: {_first_line(e)}") from None
            except RayTaskError as e:
                if what == "start":
                    raise ReplicaLost(f"rank {rank} failed to {what}: {_first_line(e)}") from None
                answers.append(e)  # the rank's own error: the caller decides what it means
        return answers

    def decode(self, prompts: list[list[int]], seeds: list[int]) -> Any:
        """prophet.decode.decode on every rank at once; rank 0's result, once every rank agrees with it.

        Every rank raising is the rows' doing (the caller isolates the bad row, still in lockstep);
        a rank lost, or ranks out of step (one raised, another did not), ends the replica."""
        try:
            return self._decode(prompts, seeds)
        except ReplicaLost as e:
            self._lost(e)
            raise  # only where on_loss returns (tests)

    def _decode(self, prompts: list[list[int]], seeds: list[int]) -> Any:
        from prophet.decode import decode

        refs = [r.decode.remote(prompts, seeds) for r in self.ranks]
        mine: Any
        try:
            mine = decode(self.model, prompts, self.config, seeds=seeds)
        except Exception as e:  # a collective's error on a lost peer lands here too: the ranks' answers tell
            mine = e
        return settle(mine, self._wait(refs, self.spec.replica.timeout_s, "decode"))

    def _count_restart(self) -> None:
        """Where Ray restarted this actor, tell the run's counter (never fails the replica)."""
        if not self.spec.replica.counter:
            return
        try:
            import ray

            with warnings.catch_warnings():  # Ray 2.60's property reads its own deprecated actor_id
                warnings.simplefilter("ignore", DeprecationWarning)
                restarted = ray.get_runtime_context().was_current_actor_reconstructed
            if restarted:
                ray.get(ray.get_actor(self.spec.replica.counter).record_restarted.remote(), timeout=10)
        except Exception:
            pass  # the count is a report

    def _lost(self, e: ReplicaLost) -> None:
        """Record the loss in the run's counter, then hand over to on_loss (which exits the process)."""
        reason = str(e).splitlines()[0][:500]
        if self.spec.replica.counter:
            try:
                import ray

                ray.get(ray.get_actor(self.spec.replica.counter).record.remote(reason), timeout=10)
            except Exception:
                pass  # the count is a report; losing it must not keep the replica from restarting
        self.on_loss(reason)


def settle(mine: Any, theirs: list[Any]) -> Any:
    """Rank 0's decode result once the other ranks' answers ((tokens, num_generated) lists, or the exception
    a rank raised) agree with it; `mine` is rank 0's DecodeResult or exception.

    Every rank raising the same error, not a collective's, is the rows' doing: rank 0's exception is
    raised (the caller isolates the bad row, still in lockstep). Ranks raising different errors, or a
    collective's (one rank failed mid-forward and its peers' all-reduce then failed: the group is broken),
    or some raising and some not: the replica is lost (ReplicaLost). Tokens that differ: RuntimeError
    (the sharded forward is not deterministic across ranks)."""
    failed = [isinstance(a, BaseException) for a in [mine, *theirs]]
    if all(failed):
        errors = [_first_line(e) for e in [mine, *theirs]]
        broken = [i for i, e in enumerate([mine, *theirs]) if _collective_error(e)]
        if broken or len(set(errors)) > 1:
            rank = broken[0] if broken else next(i for i, e in enumerate(errors) if e != errors[0])
            raise ReplicaLost(f"ranks failed apart: rank {rank} raised {errors[rank]}")
        raise mine
    if any(failed):
        rank = failed.index(True)
        raise ReplicaLost(f"ranks out of step: rank {rank} raised "
                          f"{_first_line(mine if rank == 0 else theirs[rank - 1])}")
    expected = (mine.tokens.tolist(), mine.num_generated.tolist())
    for rank, answer in enumerate(theirs, start=1):
        if tuple(answer) != expected:
            raise RuntimeError(f"tensor parallel ranks disagree: rank {rank}'s tokens differ from rank 0's "
                               "(the sharded forward is not deterministic across ranks)")
    return mine


def _collective_error(e: BaseException) -> bool:
    """A process group's error (gloo, NCCL: a peer gone, a timeout), a rank's own rather than Ray's wrapper."""
    import torch.distributed as dist

    cause = getattr(e, "cause", None)
    e = cause if isinstance(cause, BaseException) else e
    text = str(e)
    return isinstance(e, dist.DistError) or any(k in text for k in ("gloo", "NCCL", "Connection closed", "ProcessGroup"))


def _first_line(e: BaseException) -> str:
    """'Type: first line' of an error; a rank's own exception rather than Ray's wrapper around it."""
    cause = getattr(e, "cause", None)
    e = cause if isinstance(cause, BaseException) else e
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"
