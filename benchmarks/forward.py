"""Forward-pass throughput of the native LLaDA architecture: model FLOPs utilisation (MFU).

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

import time
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from prophet.models.llada import LLaDAConfig, LLaDAModel

TINY = LLaDAConfig(d_model=64, n_heads=4, n_layers=2, mlp_hidden_size=192, vocab_size=128,
                   max_sequence_length=1024, mask_token_id=1, eos_token_id=2, pad_token_id=0,
                   eot_token_id=None, bos_token_id=None)
MODELS = {"llada-8b": LLaDAConfig(), "tiny": TINY}  # LLaDAConfig's defaults are LLaDA-8B's


def forward_flops(cfg: LLaDAConfig, batch: int, seq: int, keep: int = 0) -> int:
    """FLOPs of one forward over (batch, seq) tokens; keep > 0: LM head on the last `keep` only."""
    d, kv = cfg.d_model, cfg.d_model // cfg.n_heads * int(cfg.n_kv_heads)  # type: ignore[arg-type]
    per_token = cfg.n_layers * (d * d + 2 * d * kv + d * d + 3 * d * cfg.mlp_hidden_size)  # q, k, v, o, MLP
    head = d * cfg.logit_width * (keep or seq)
    attention = 2 * cfg.n_layers * seq * seq * d  # QK^T and AV multiply-adds per row
    return 2 * batch * (per_token * seq + head + attention)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 8192, repeats: int = 10) -> float:
    """Best FLOP/s of an n x n x n matmul in `dtype` on `device` (the achievable peak)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = _best_seconds(lambda: a @ b, device, repeats)
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


def random_llada(cfg: LLaDAConfig, device: torch.device, dtype: torch.dtype) -> LLaDAModel:
    """A LLaDA of `cfg` with random weights, built on the device in the dtype, in eval mode."""
    with _building_on(device, dtype):
        return LLaDAModel(cfg).eval()


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
        seconds = _best_seconds(lambda: model(ids, None, logits_to_keep=keep), device, repeats)
        flops = forward_flops(cfg, batch, seq, keep)
        rows.append({"batch": batch, "seq": seq, "seconds": seconds, "tflops": flops / seconds / 1e12,
                     "mfu": flops / seconds / peak, "gflop_per_token": flops / (batch * seq) / 1e9,
                     "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2 ** 30
                                         if device.type == "cuda" else None)})
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(dtype).removeprefix("torch."), "parameters": params,
            "matmul_peak_tflops": peak / 1e12, "peak_matmul_n": peak_n, "logits_kept": keep or "all",
            "torch": torch.__version__, "shapes": rows}
