"""`--section tp`: what tensor parallelism costs on this CPU (issue 20, SPEC section 9).

One decode of prompts of the default job (`pipeline/data/default_prompts.jsonl`: Sudoku and
running parity, both tasks) by the shipped tiny-llada per cache mode (none, prefix, dual) and by
tiny-llada2 on the block host (which stops a row at its EOS block), at tp 1 (rank 0 alone, one
thread, while rank 1 waits at a barrier) and at tp 2 (two local processes on a gloo group, one
thread each, the model sharded by DeepSpeed AutoTP: `pipeline.parallel.shard_with_deepspeed`):
wall time, the share of it spent inside all-reduces (`torch.distributed.all_reduce` wrapped and
timed on each rank; a rank that arrives first waits there for the other, so the share holds the
ranks' skew too), the all-reduces and bytes reduced, and whether the tokens equal tp 1's. Runs are
interleaved (tp 1, tp 2, per case, per repeat) and the best of `--repeats` counts; ratios are tp 2
over tp 1 of the same case in one run.

It measures the cost of communication, not a speed-up: the layers are 128 wide, so a rank's half
of one costs less than the all-reduce after it (1.5-2.6 ms over gloo on loopback here,
BENCHMARKS.md), and the two ranks share a 2-core machine. Tensor parallelism pays where a model
does not fit one device, or for one batch's latency on GPUs joined by NVLink
(docs/tensor-parallel.md).
"""
from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Iterator

import torch

from benchmarks.cache import workload
from benchmarks.harness import ROOT, Table

# model -> cases: (cache label, DecodeConfig fields); the block host has its own exact cache
MODELS = {"tiny-llada": {c: dict(cache=c) for c in ("none", "prefix", "dual")},
          "tiny-llada2": {"exact": dict(host="block")}}
TABLE = Table(("model", "<11"), ("cache", "<6"), ("tp", ">2"), ("wall s", "8.3f"), ("tp2/tp1", "7.2f"),
              ("in all-reduce", ">13"), ("all-reduces", "11d"), ("MB reduced", "10.1f"), ("tokens = tp1", ">12"))


class CollectiveClock:
    """Counts and times every torch.distributed.all_reduce while installed (DeepSpeed's row-parallel
    layers call it by name, so wrapping the module's attribute sees them all)."""

    def __init__(self) -> None:
        self.calls = 0
        self.bytes = 0
        self.seconds = 0.0

    @contextmanager
    def installed(self) -> Iterator[CollectiveClock]:
        """Wrap all_reduce for the block's duration."""
        import torch.distributed as dist

        original = dist.all_reduce

        def timed(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = original(tensor, *args, **kwargs)  # gloo and async_op=False: returns when reduced
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            self.bytes += tensor.numel() * tensor.element_size()
            return out

        dist.all_reduce = timed
        try:
            yield self
        finally:
            dist.all_reduce = original


def default_job_prompts(n: int) -> list[str]:
    """n prompts of the default job, spread over its file (so both of its tasks are in)."""
    import json

    rows = (ROOT / "pipeline" / "data" / "default_prompts.jsonl").read_text().splitlines()
    return [json.loads(rows[i * len(rows) // n])["prompt"] for i in range(n)]


def _decode_timed(model: Any, prompts: list[list[int]], cfg: Any) -> tuple[float, Any]:
    """Wall seconds and result of one decode."""
    from prophet import decode

    t0 = time.perf_counter()
    res = decode(model, prompts, cfg)
    return time.perf_counter() - t0, res


def rank_measure(rank: int, world: int, names: tuple[str, ...], spec: dict, repeats: int) -> dict:
    """One rank's timings (run by run_local_ranks): per model and case, the best tp 1 decode (rank 0
    only), the best tp `world` decode with its all-reduces, and the tokens of both."""
    import torch.distributed as dist

    from pipeline.parallel import shard_with_deepspeed
    from prophet import DecodeConfig
    from prophet.models import load_model

    out: dict = {}
    for name in names:
        whole = load_model(str(ROOT / "checkpoints" / name), device="cpu", dtype=torch.float32)
        sharded = load_model(str(ROOT / "checkpoints" / name), device="cpu", dtype=torch.float32)
        sharded.module = shard_with_deepspeed(sharded.module, sharded.dtype, world)
        prompts = [whole.encode(p) for p in default_job_prompts(spec["slots"])]
        base = DecodeConfig(gen_length=spec["window"], steps=spec["window"], block_length=spec["block"],
                            batch_size=spec["slots"])
        best: dict = {}
        for _ in range(repeats):
            for case, fields in MODELS[name].items():
                cfg = replace(base, **fields)
                rec = best.setdefault(case, {"tp1_s": float("inf"), "tp_s": float("inf")})
                if rank == 0:  # tp 1: one process on one core; rank 1 idles at the barrier (gloo's wait
                    # blocks: 8 ms of CPU in a 3 s wait, measured), so tp 1 has a core to itself as well
                    wall, res = _decode_timed(whole, prompts, cfg)
                    rec["tp1_s"], rec["tp1_tokens"] = min(rec["tp1_s"], wall), res.tokens.tolist()
                dist.barrier()  # both ranks start the sharded decode together
                clock = CollectiveClock()
                with clock.installed():
                    wall, res = _decode_timed(sharded, prompts, cfg)
                if wall < rec["tp_s"]:
                    rec.update(tp_s=wall, allreduce_s=clock.seconds, allreduces=clock.calls, bytes=clock.bytes,
                               forward_tokens=int(res.forward_tokens.sum()))
                rec["tp_tokens"] = res.tokens.tolist()
                dist.barrier()
        out[name] = best
    return out


def _all_agree(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on every rank (the ranks decode in lockstep or not at all)."""
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def rank_check(rank: int, world: int, cfg: Any, spec: dict, dtype: torch.dtype, deadline: float) -> dict:
    """One rank of the GPU script's tp check (run by run_local_ranks): a random LLaDA of `cfg` (rank 0's
    weights on every rank), one decode whole on rank 0 (tp 1), then sharded over the `world` ranks (tp
    `world`); each decode starts only before `deadline` (time.time() seconds). Rank 0 returns tokens/s
    and whether the tokens agree."""
    import torch.distributed as dist

    from benchmarks.forward import random_llada
    from benchmarks.harness import sync
    from pipeline.parallel import shard_with_deepspeed
    from prophet import DecodeConfig
    from prophet.models import NativeAdapter, char_tokenizer

    # run_local_ranks made cuda:rank current before the NCCL group formed
    device = torch.device("cuda", rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    net = random_llada(cfg, device, dtype)
    with torch.no_grad():
        for p in net.parameters():  # one model on every rank, whatever each device's random stream
            dist.broadcast(p.data, 0)
    model = NativeAdapter(net, char_tokenizer(), name="random-llada")
    prompts = workload(spec["slots"], spec["prompt"], cfg.vocab_size)
    base = DecodeConfig(gen_length=spec["window"], steps=spec["steps"], block_length=spec["block"],
                        batch_size=spec["slots"], cache=spec["cache"])
    warm = replace(base, steps=base.num_blocks, batch_size=2)
    out: dict = {"build_s": time.perf_counter() - t0}

    def timed() -> tuple[float, list]:
        from prophet import decode

        decode(model, prompts[:2], warm)  # kernels, allocator, NCCL's first connection
        sync(device)
        t = time.perf_counter()
        res = decode(model, prompts, base)
        sync(device)
        return time.perf_counter() - t, res.tokens.tolist()

    if rank == 0 and time.time() < deadline:
        out["tp1_s"], out["tp1_tokens"] = timed()
    if not _all_agree(time.time() < deadline, device):
        return {**out, "skipped": "time budget spent"}
    model.module = shard_with_deepspeed(net, dtype, world)
    out["tp_s"], out["tp_tokens"] = timed()
    if rank == 0 and "tp1_tokens" in out:
        a, b = torch.tensor(out["tp1_tokens"]), torch.tensor(out["tp_tokens"])
        out["tokens_equal"] = bool(torch.equal(a, b))
        out["token_agreement"] = float((a == b).double().mean())
    n = spec["slots"] * spec["window"]
    out.update({k.replace("_s", "_tokens_per_s"): n / out[k] for k in ("tp1_s", "tp_s") if k in out})
    return out


def gpu_check(cfg: Any, spec: dict, dtype: torch.dtype, seconds: float, backend: str = "nccl") -> dict:
    """The GPU script's tp check: tp 1 against tp 2 on two local ranks over `backend` (NCCL where the
    machine has two GPUs; gloo runs the same code on a CPU), or why it was skipped."""
    from pipeline.parallel import run_local_ranks

    gpus = torch.cuda.device_count()
    if backend == "nccl" and gpus < 2:
        return {"skipped": f"tensor parallelism needs 2 GPUs on one machine; this one has {gpus}"}
    if seconds <= 0:
        return {"skipped": "time budget spent"}
    try:
        import deepspeed  # noqa: F401  (the sharding is DeepSpeed's)
    except ImportError:
        return {"skipped": "deepspeed is not installed here"}
    t0 = time.perf_counter()
    try:
        ranks = run_local_ranks(rank_check, 2, cfg, spec, dtype, time.time() + seconds, backend=backend,
                                timeout_s=seconds + 300)
    except (RuntimeError, TimeoutError) as e:  # a failed check is reported, the rest of the script's figures kept
        return {"failed": str(e)[-2000:], "backend": backend}
    out = {k: v for k, v in ranks[0].items() if not k.endswith("_tokens")}
    return {"backend": backend, "world": 2, "dtype": str(dtype).removeprefix("torch."), **spec, **out,
            "total_s": time.perf_counter() - t0}


CHECK_TABLE = Table(("tp", ">2"), ("wall s", "8.2f"), ("tok/s", "9.1f"))


def print_check(out: dict) -> None:
    """gpu_check's result as printed lines: why it was skipped or failed, or tp 1 against tp 2."""
    reason = out.get("skipped") or out.get("failed")
    if reason:
        print(f"gpu: tp check {'skipped' if 'skipped' in out else 'FAILED'}: {reason}")
    if "tp1_s" not in out:
        return
    print(f"gpu: tp check, random {out['dtype']} LLaDA on 2 ranks over {out['backend']}: {out['slots']} prompts of "
          f"{out['prompt']}, window {out['window']}, {out['steps']} steps, cache {out['cache']}")
    CHECK_TABLE.print([(1, out.get("tp1_s"), out.get("tp1_tokens_per_s")),
                       (2, out.get("tp_s"), out.get("tp_tokens_per_s"))])
    if "tokens_equal" in out:
        print(f"  tokens at tp 2 equal tp 1's: {'yes' if out['tokens_equal'] else 'NO'} "
              f"({100 * out['token_agreement']:.2f}% of positions agree)")


def run(args: argparse.Namespace) -> dict:
    """tp 1 against tp 2 per model and cache mode on local gloo ranks; prints the table, returns the JSON object."""
    from pipeline.parallel import run_local_ranks

    asked = args.tp_models.split(",")
    if unknown := sorted(set(asked) - set(MODELS)):
        raise SystemExit(f"bench tp: --tp-models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    names = tuple(n for n in MODELS if n in asked)
    spec = dict(window=args.tp_window, block=args.tp_block, slots=args.tp_slots)
    t0 = time.perf_counter()
    ranks = run_local_ranks(rank_measure, 2, names, spec, args.repeats, threads=1)
    total = time.perf_counter() - t0
    out: dict = {"world": 2, "backend": "gloo", "threads_per_rank": 1, "prompts": "default job",
                 "window": args.tp_window, "block": args.tp_block, "slots": args.tp_slots, "repeats": args.repeats,
                 "total_s": total, "cases": []}
    print(f"tp: tp 1 (one process, one thread) vs tp 2 (two gloo ranks, one thread each, DeepSpeed AutoTP), "
          f"{args.tp_slots} prompts of the default job, window {args.tp_window} (steps = window), blocks of "
          f"{args.tp_block}, best of {args.repeats}, fp32")
    print("  The cost of communication on a 2-core CPU, not a speed-up: 'in all-reduce' is rank 0's / rank 1's "
          "share of the tp 2 wall time spent in all-reduces")
    print(TABLE.header())
    for name in names:
        for case, r0 in ranks[0][name].items():
            r1 = ranks[1][name][case]
            equal = r0["tp_tokens"] == r0["tp1_tokens"] == r1["tp_tokens"]
            row = {"model": name, "cache": case, "tp1_wall_s": r0["tp1_s"], "tp2_wall_s": r0["tp_s"],
                   "tp2_over_tp1": r0["tp_s"] / r0["tp1_s"], "allreduce_share": r0["allreduce_s"] / r0["tp_s"],
                   "allreduce_share_rank1": r1["allreduce_s"] / r1["tp_s"], "allreduce_s": r0["allreduce_s"],
                   "allreduces": r0["allreduces"], "bytes_reduced": r0["bytes"], "forward_tokens": r0["forward_tokens"],
                   "tokens_equal": equal}
            out["cases"].append(row)
            print(TABLE.row(name, case, 1, row["tp1_wall_s"], 1.0, None, 0, 0.0, None))
            share = f"{100 * row['allreduce_share']:.0f}% / {100 * row['allreduce_share_rank1']:.0f}%"
            print(TABLE.row(name, case, 2, row["tp2_wall_s"], row["tp2_over_tp1"], share, row["allreduces"],
                            row["bytes_reduced"] / 1e6, "yes" if equal else "NO"))
    out["tokens_equal"] = all(c["tokens_equal"] for c in out["cases"])
    print(f"  tokens at tp 2 equal tp 1's in every case: {'yes' if out['tokens_equal'] else 'NO'}; "
          f"{total:.0f} s in all (spawning and loading included)")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The section's flags."""
    p.add_argument("--tp-models", default="tiny-llada,tiny-llada2", help="tp: comma-separated, of " + ", ".join(MODELS))
    p.add_argument("--tp-window", type=int, default=64, help="tp: generation window (= steps)")
    p.add_argument("--tp-block", type=int, default=8, help="tp: block length (tiny-llada2's is 8)")
    p.add_argument("--tp-slots", type=int, default=16, help="tp: slots (and prompts of the default job)")
