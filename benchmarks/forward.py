"""`--section forward`: forward-pass throughput of the native LLaDA architecture, model FLOPs utilisation (MFU).

`measure_forward` builds a LLaDA with random weights straight on the device in the target dtype
(no checkpoint needed: the cost of a forward does not depend on the weights' values), times one
forward per batch x sequence shape, and divides the FLOP/s the model needed by the bf16 matmul
peak measured on the same device (`matmul_peak`), not a datasheet figure. Peak memory is the
device's high-water mark during the forward, weights included.

FLOPs counted (`forward_flops`): 2 x (multiply-adds of every linear layer) per position, the LM
head on the positions whose logits are kept, and the attention products (QK^T and AV,
4 x B x L^2 x d per layer). Norms, rotary and softmax are left out, as MFU conventionally does.
"""
from __future__ import annotations

import argparse
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence, TypeVar

import torch

from benchmarks.harness import Table, best_seconds
from prophet.models.llada import LLaDAConfig, LLaDAModel

TINY = LLaDAConfig(d_model=64, n_heads=4, n_layers=2, mlp_hidden_size=192, vocab_size=128,
                   max_sequence_length=1024, mask_token_id=1, eos_token_id=2, pad_token_id=0,
                   eot_token_id=None, bos_token_id=None)
MODELS = {"llada-8b": LLaDAConfig(), "tiny": TINY}  # LLaDAConfig's defaults are LLaDA-8B's
C = TypeVar("C")
M = TypeVar("M")
NEEDS_GPU = True  # not in jobs/bench.py's default sections without one
SHAPES_TABLE = Table(("batch x seq", ">12"), ("ms", "9.2f"), ("TFLOP/s", "8.2f"), ("MFU", ">6"), ("GFLOP/tok", "9.2f"),
                     ("peak GiB", "8.2f"))


def forward_flops(cfg: LLaDAConfig, batch: int, seq: int, keep: int = 0) -> int:
    """FLOPs of one forward over (batch, seq) tokens; keep > 0: LM head on the last `keep` only."""
    d, kv = cfg.d_model, cfg.d_model // cfg.n_heads * int(cfg.n_kv_heads)  # type: ignore[arg-type]
    per_token = cfg.n_layers * (d * d + 2 * d * kv + d * d + 3 * d * cfg.mlp_hidden_size)  # q, k, v, o, MLP
    head = d * cfg.logit_width * (keep or seq)
    attention = 2 * cfg.n_layers * seq * seq * d  # QK^T and AV multiply-adds per row
    return 2 * batch * (per_token * seq + head + attention)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 8192, repeats: int = 10) -> float:
    """Best FLOP/s of an n x n x n matmul in `dtype` on `device` (the achievable peak)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = best_seconds(lambda: a @ b, device, repeats)
    return 2 * n ** 3 / seconds


@contextmanager
def _building_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """New parameters are created on `device` in `dtype`: no fp32 or host copy of 8B weights."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(before)


def random_model(model_cls: Callable[[C], M], cfg: C, device: torch.device, dtype: torch.dtype) -> M:
    """model_cls(cfg) with random weights, built on the device in the dtype, in eval mode."""
    with _building_on(device, dtype):
        return model_cls(cfg).eval()  # type: ignore[attr-defined]


def random_llada(cfg: LLaDAConfig, device: torch.device, dtype: torch.dtype) -> LLaDAModel:
    """A LLaDA of `cfg` with random weights, built on the device in the dtype, in eval mode."""
    return random_model(LLaDAModel, cfg, device, dtype)


def parse_shapes(spec: str) -> list[tuple[int, int]]:
    """'1x384,8x384' -> [(1, 384), (8, 384)]."""
    try:
        shapes = [tuple(int(v) for v in item.lower().split("x")) for item in spec.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise ValueError(f"shapes {spec!r}: give BATCHxSEQUENCE,... such as 1x384,8x384,32x512")
    return shapes  # type: ignore[return-value]


@torch.inference_mode()
def measure_forward(cfg: LLaDAConfig, shapes: Sequence[tuple[int, int]], device: torch.device,
                    dtype: torch.dtype = torch.bfloat16, repeats: int = 5, peak_n: int = 8192,
                    keep: int = 0) -> dict:
    """Seconds, TFLOP/s, MFU and peak memory of one forward per shape, against the measured peak."""
    peak = matmul_peak(device, dtype, n=peak_n)
    model = random_llada(cfg, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for batch, seq in shapes:
        if seq > cfg.max_sequence_length:
            raise ValueError(f"sequence {seq} exceeds the model's max_sequence_length {cfg.max_sequence_length}")
        g = torch.Generator(device=device).manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device, generator=g)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        seconds = best_seconds(lambda: model(ids, None, logits_to_keep=keep), device, repeats)
        flops = forward_flops(cfg, batch, seq, keep)
        rows.append({"batch": batch, "seq": seq, "seconds": seconds, "tflops": flops / seconds / 1e12,
                     "mfu": flops / seconds / peak, "gflop_per_token": flops / (batch * seq) / 1e9,
                     "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2 ** 30
                                         if device.type == "cuda" else None)})
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(dtype).removeprefix("torch."), "parameters": params,
            "matmul_peak_tflops": peak / 1e12, "peak_matmul_n": peak_n, "logits_kept": keep or "all",
            "torch": torch.__version__, "shapes": rows}


def run(args: argparse.Namespace) -> dict:
    """Native LLaDA forward per batch x sequence: seconds, TFLOP/s, MFU against the measured bf16
    matmul peak, peak memory. LLaDA-8B needs a GPU; `--forward-model tiny` is the CPU smoke run."""
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.forward_model == "llada-8b" and device.type != "cuda":
        raise SystemExit("bench forward: LLaDA-8B (16 GB of bf16 weights) needs a GPU; "
                         "use --forward-model tiny for a CPU run of the same code")
    try:
        shapes = parse_shapes(args.forward_shapes)
    except ValueError as e:
        raise SystemExit(f"--forward-shapes: {e}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.forward_dtype]
    out = measure_forward(MODELS[args.forward_model], shapes, device, dtype, repeats=args.repeats,
                          peak_n=args.peak_n)
    out["model"] = f"{args.forward_model} (random weights)"
    print(f"forward: {out['model']}, {out['parameters'] / 1e9:.2f}B parameters, {out['dtype']} on {out['device']}; "
          f"measured matmul peak {out['matmul_peak_tflops']:.1f} TFLOP/s (n={out['peak_matmul_n']})")
    print_shapes(out)
    return out


def print_shapes(out: dict) -> None:
    """The table of measure_forward's shapes (this section's and the gpu section's)."""
    SHAPES_TABLE.print([(f"{r['batch']:>5} x {r['seq']:<5}", 1e3 * r["seconds"], r["tflops"], f"{100 * r['mfu']:5.1f}%",
                         r["gflop_per_token"], r["peak_memory_gib"]) for r in out["shapes"]])


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The section's flags (--forward-shapes and --peak-n serve the gpu section too)."""
    p.add_argument("--forward-model", choices=["llada-8b", "tiny"], default="llada-8b",
                   help="forward: LLaDA-8B (GPU) or a tiny LLaDA (any device), random weights")
    p.add_argument("--forward-shapes", default="1x384,8x384,32x512", help="forward: BATCHxSEQUENCE,...")
    p.add_argument("--forward-dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="forward: weights dtype")
    p.add_argument("--device", default="auto", help="forward: cuda, cuda:N or cpu (auto: cuda if present)")
    p.add_argument("--peak-n", type=int, default=8192, help="forward: n of the n x n x n matmul that measures the peak")
