"""Tensor parallelism: DeepSpeed AutoTP shards a native model over the replica's process group.

gpt-fast's habit: parallelism is applied to an already built model, and the decode loop never sees
it. Every rank of a replica holds the same model class; `shard_with_deepspeed` hands it to
`deepspeed.init_inference(tp_size=N)` with the family's policy (`tensor_parallel_policy()`: for
each module class, the linears whose outputs are summed over the ranks), after the family has
reshaped what AutoTP cannot split by itself (`prepare_tensor_parallel`: LLaDA2's fused QKV rows,
the experts of a mixture-of-experts layer). Column-parallel projections give each rank whole heads;
the attention takes its head counts from its sharded projections, and the KV cache holds only the
rank's heads.

What was found measuring AutoTP 0.19.8 on our modules (SPEC section 9):
- A policy names a linear by its path below the policy's class, with a leading '.' for a direct
  child ('.attn_out'), because AutoTP joins the parent's name and the child's with a '.' and the
  parent of a direct child is ''. Without the dot the name never matches and the row-parallel
  output projection is split as a column-parallel one, the failure the first probe met.
- On CPU DeepSpeed's shared-memory all-reduce (`deepspeed_shm_comm`) segfaults unless LOCAL_SIZE
  is set, and, where it runs, a dead peer leaves its ranks spinning on shared-memory flags forever.
  It is switched off: the all-reduce goes through the process group (gloo on CPU, NCCL on GPUs),
  which reports a dead peer as an error.
"""
from __future__ import annotations

from typing import Any


def disable_shm_allreduce() -> None:
    """Make DeepSpeed's CPU all-reduce use the process group (see the module docstring); call before
    DeepSpeed creates its communication backend (the first init_inference)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def shard_with_deepspeed(module: Any, dtype: Any, tp_size: int) -> Any:
    """The DeepSpeed inference engine of `module` sharded over the initialised process group of
    `tp_size` ranks (every rank calls this with the same module); tp_size 1 wraps it whole."""
    import deepspeed

    kwargs: dict[str, Any] = {}
    if tp_size > 1:
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() != tp_size:
            raise RuntimeError(f"tensor parallel size {tp_size} needs an initialised process group of "
                               f"{tp_size} ranks (have {dist.get_world_size() if dist.is_initialized() else 0})")
        policy = getattr(module, "tensor_parallel_policy", None)
        if policy is None:
            raise RuntimeError(f"{type(module).__name__} has no tensor_parallel_policy: only the native "
                               "families can be sharded")
        disable_shm_allreduce()
        prepare = getattr(module, "prepare_tensor_parallel", None)
        if prepare is not None:
            prepare(dist.get_rank(), tp_size)
        kwargs["injection_policy"] = policy()
    # Widths split in whole heads: AutoTP cuts a width it cannot relate to the config's KV heads in
    # grains of 64 (a rank may get none of a narrow MLP, or part of a head where head_dim < 64).
    tp = {"tp_size": tp_size, **({"tp_grain_size": module.head_dim} if tp_size > 1 else {})}
    # dtype is always explicit: DeepSpeed's default is fp16, which many CPUs refuse.
    engine = deepspeed.init_inference(module, dtype=dtype, tensor_parallel=tp, replace_with_kernel_inject=False,
                                      **kwargs)
    if tp_size > 1:
        check_row_parallel(engine.module, kwargs["injection_policy"])
    return engine


def check_row_parallel(module: Any, policy: dict) -> None:
    """Refuse a sharded module whose policy's row-parallel linears AutoTP did not replace: the '.name'
    convention is how DeepSpeed 0.19 joins names, and a version that joins them otherwise would split
    those projections as column-parallel and compute garbage without a word."""
    import deepspeed

    for owner in module.modules():
        for path in policy.get(type(owner), ()):
            target = owner.get_submodule(path.lstrip("."))
            if "Allreduce" not in type(target).__name__:
                raise RuntimeError(f"DeepSpeed {deepspeed.__version__} did not make {type(owner).__name__}{path} "
                                   "row-parallel (its AutoTP policy names changed?): tensor parallelism is checked "
                                   "with deepspeed 0.19.8")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (the rendezvous of a process group)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_rank(rank: int, world: int, addr: str, port: int, backend: str = "gloo", timeout_s: float = 300.0,
              store: Any = None, local_rank: int | None = None) -> None:
    """Join the process group of `world` ranks that meets at addr:port (through `store` where the caller
    hosts it: rank 0 of a replica), and set DeepSpeed up on it.

    DeepSpeed would otherwise shard over a group of its own, made with torch's default timeout (30 min
    for gloo); handing it one made here bounds how long a rank waits for a peer that hangs, and its own
    communication set-up then runs over this group, its CPU shared-memory path off. The variables
    DeepSpeed reads where it looks for a launcher are set too; local_rank: the device index it takes
    (default the rank; 0 in a Ray actor, which sees its one GPU only)."""
    import datetime
    import os

    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank if local_rank is None else local_rank))
    if store is None:
        store = dist.TCPStore(addr, port, world, is_master=rank == 0, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    import deepspeed.comm
    from deepspeed.inference.engine import InferenceEngine

    disable_shm_allreduce()
    deepspeed.comm.init_distributed(verbose=False)
    InferenceEngine.inference_mp_group = dist.new_group(list(range(world)), timeout=timeout)


def _local_rank(rank: int, world: int, port: int, threads: int, backend: str, fn: Any, args: tuple,
                results: Any) -> None:
    """One process of run_local_ranks: join the group, run fn, send back its result or its traceback."""
    import traceback

    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        if backend == "nccl":  # NCCL binds a rank to the device current when its group forms
            torch.cuda.set_device(rank)
        init_rank(rank, world, "127.0.0.1", port, backend)
        results.put((rank, True, fn(rank, world, *args)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local_ranks(fn: Any, world: int, *args: Any, threads: int = 1, timeout_s: float = 600.0,
                    backend: str = "gloo") -> list:
    """fn(rank, world, *args) in `world` fresh local processes joined in one process group (gloo; "nccl"
    on GPUs, where fn picks its device first) -> the ranks' results in rank order (for tests and
    benchmarks; the pipeline's ranks are Ray actors). fn must be importable by name (a module-level
    function); a rank's exception is raised here with its traceback."""
    import multiprocessing as mp
    import queue

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_local_rank, args=(r, world, port, threads, backend, fn, args, results), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, Any] = {}
    try:
        while len(got) < world:
            try:
                rank, ok, value = results.get(timeout=timeout_s)
            except queue.Empty:
                raise TimeoutError(f"ranks {sorted(set(range(world)) - set(got))} gave no result in {timeout_s:g} s")
            if not ok:
                raise RuntimeError(f"rank {rank} of {world} failed:\n{value}")
            got[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [got[r] for r in range(world)]
