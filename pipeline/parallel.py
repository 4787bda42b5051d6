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
    # dtype is always explicit: DeepSpeed's default is fp16, which many CPUs refuse.
    return deepspeed.init_inference(module, dtype=dtype, tensor_parallel={"tp_size": tp_size},
                                    replace_with_kernel_inject=False, **kwargs)
