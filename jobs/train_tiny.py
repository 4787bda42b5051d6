"""Train the tiny LLaDA, Dream and LLaDA2 models on the synthetic tasks with the masked-diffusion objective.

    .venv/bin/python jobs/train_tiny.py --family llada --out checkpoints/tiny-llada
    .venv/bin/python jobs/train_tiny.py --family dream --out checkpoints/tiny-dream
    .venv/bin/python jobs/train_tiny.py --family llada2 --out checkpoints/tiny-llada2

Objective (LLaDA's): draw t ~ U[eps, 1] per row, mask each window position (answer and its EOS
padding, of a length drawn per row up to --max-window; never the prompt) with probability t, cross-entropy on the masked positions weighted by
1/t. Logits come from the adapter's own aligned `logits()` body, so Dream trains through its
one-position shift exactly as it decodes. Fresh examples every step; everything is seeded.

LLaDA2 (block diffusion) trains with BD3-LM's objective instead: every block of a row (counted from
its position 0) is masked at its own ratio t_b, and one pass over the noisy row followed by the
clean row predicts each noisy block from itself and the clean blocks before it (see
layers.two_copy_block_inputs); the loss is the same 1/t-weighted masked cross-entropy. Its expert
biases follow the auxiliary-loss-free balancing LLaDA2 trains with: after each step every router's
bias moves by --bias-rate toward the experts that got fewer than their share of tokens.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prophet.models import load_model, save_model  # noqa: E402
from prophet.models.adapter import NativeAdapter  # noqa: E402
from prophet.models.dream import DreamConfig, DreamModel  # noqa: E402
from prophet.models.layers import position_ids, two_copy_block_inputs  # noqa: E402
from prophet.models.llada import LLaDAConfig, LLaDAModel  # noqa: E402
from prophet.models.llada2 import LLaDA2Config, LLaDA2Model  # noqa: E402
from prophet.models.moe import Router  # noqa: E402
from prophet.models.tokenizer import CHAR_TOKEN_IDS, char_tokenizer  # noqa: E402
from prophet.tasks import TASKS, Example, Task, get_task  # noqa: E402
from prophet.tasks.evaluation import run_task, task_config  # noqa: E402

T_EPS = 1e-3  # floor of the masking ratio t (LLaDA's eps)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one run (all recorded next to the checkpoint)."""

    family: str = "llada"
    steps: int = 2000
    # examples per step of each task; running_parity is the simpler task and gets fewer
    batch: tuple[tuple[str, int], ...] = (("sudoku4", 128), ("running_parity", 64))
    lr: float = 2e-3
    warmup: int = 100
    final_lr_frac: float = 0.05  # cosine decays to this fraction of lr
    weight_decay: float = 0.01
    clip: float = 1.0
    seed: int = 0
    width: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2            # Dream and LLaDA2 (grouped KV); LLaDA uses full heads
    mlp: int = 384               # SwiGLU width (LLaDA2: of its dense layers)
    # LLaDA2 only: the mixture of experts and the attention block
    experts: int = 8
    top_k: int = 2
    groups: int = 2              # expert groups; a token routes inside the best topk_group of them
    topk_group: int = 1
    expert_mlp: int = 96         # one routed expert's SwiGLU width (the shared expert's too)
    shared_experts: int = 1
    dense_layers: int = 1        # first_k_dense_replace
    block: int = 8               # attention block (the window of 24 spans 3-4 blocks)
    bias_rate: float = 1e-3      # expert-bias step of the loss-free load balancing
    threads: int = 1
    max_window: int = 24         # windows are drawn in [longest answer + 1, max_window] per row


@dataclass
class Batch:
    """A left-padded batch of one task."""

    ids: torch.Tensor        # (B, L) int64, clean tokens
    attn: torch.Tensor       # (B, L) bool, False on left padding
    window: torch.Tensor     # (B, L) bool, the generation window (answer + EOS padding)


def build_module(cfg: TrainConfig, vocab_size: int, max_length: int) -> torch.nn.Module:
    """A fresh tiny module of the family, sized by cfg, with the char tokenizer's ids."""
    common = dict(vocab_size=vocab_size, rope_theta=10000.0, **CHAR_TOKEN_IDS)
    if cfg.family == "llada":
        return LLaDAModel(LLaDAConfig(d_model=cfg.width, n_heads=cfg.heads, n_layers=cfg.layers,
                                      mlp_hidden_size=cfg.mlp, max_sequence_length=max_length, **common))
    if cfg.family == "dream":
        return DreamModel(DreamConfig(hidden_size=cfg.width, num_attention_heads=cfg.heads,
                                      num_key_value_heads=cfg.kv_heads, num_hidden_layers=cfg.layers,
                                      intermediate_size=cfg.mlp, max_position_embeddings=max_length,
                                      **common))
    if cfg.family == "llada2":
        return LLaDA2Model(LLaDA2Config(
            hidden_size=cfg.width, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
            head_dim=cfg.width // cfg.heads, num_hidden_layers=cfg.layers, intermediate_size=cfg.mlp,
            num_experts=cfg.experts, num_experts_per_tok=cfg.top_k, n_group=cfg.groups, topk_group=cfg.topk_group,
            moe_intermediate_size=cfg.expert_mlp, num_shared_experts=cfg.shared_experts,
            first_k_dense_replace=cfg.dense_layers, block_length=cfg.block, max_position_embeddings=max_length,
            **common))
    raise ValueError(f"family={cfg.family!r}: choose 'llada', 'dream' or 'llada2'")


def encode_batch(adapter: NativeAdapter, task: Task, examples: Sequence[Example],
                 windows: Sequence[int] | None = None) -> Batch:
    """Prompt + answer + EOS padding to each row's window (default the task's gen_length), left-padded."""
    windows = windows or [task.budget.gen_length] * len(examples)
    rows = []
    for ex, w in zip(examples, windows):
        answer = adapter.encode(ex.answer)
        rows.append(adapter.encode(ex.prompt) + answer + [adapter.eos_id] * (w - len(answer)))
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), adapter.pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), L), dtype=torch.bool)
    window = torch.zeros((len(rows), L), dtype=torch.bool)
    for i, (row, w) in enumerate(zip(rows, windows)):
        ids[i, L - len(row):] = torch.tensor(row)
        attn[i, L - len(row):] = True
        window[i, L - w:] = True  # the window is the last w positions of the row
    return Batch(ids, attn, window)


def aligned_logits(adapter: NativeAdapter, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """The adapter's logits() with autograd on: (B, L) -> aligned (B, L, V)."""
    # NativeAdapter.logits runs under inference_mode (decoding never needs gradients); calling the
    # wrapped body trains through exactly the code (and Dream shift) that decoding uses.
    return type(adapter).logits.__wrapped__(adapter, ids, attn)


def diffusion_loss(adapter: NativeAdapter, batch: Batch, gen: torch.Generator) -> torch.Tensor:
    """Masked-diffusion loss: sum over masked positions of CE / t, divided by window positions."""
    B, L = batch.ids.shape
    t = T_EPS + (1 - T_EPS) * torch.rand(B, generator=gen)                       # (B,)
    masked = batch.window & (torch.rand(B, L, generator=gen) < t[:, None])        # (B, L)
    noisy = batch.ids.masked_fill(masked, adapter.mask_id)
    logits = aligned_logits(adapter, noisy, batch.attn)                            # (B, L, V)
    ce = F.cross_entropy(logits[masked].float(), batch.ids[masked], reduction="none")  # (M,)
    weight = (1.0 / t)[:, None].expand(B, L)[masked]                               # (M,)
    return (ce * weight).sum() / batch.window.sum()


def block_diffusion_loss(adapter: NativeAdapter, batch: Batch, gen: torch.Generator) -> torch.Tensor:
    """BD3-LM loss: each block masked at its own ratio t_b (window positions only), predicted from
    itself and the clean earlier blocks in one two-copy pass; CE / t_b summed, over window positions."""
    module, bl = adapter.module, adapter.block_length
    B, L = batch.ids.shape
    block = position_ids(batch.attn) // bl                                          # (B, L)
    t = T_EPS + (1 - T_EPS) * torch.rand(B, L // bl + 1, generator=gen)             # (B, blocks)
    t_at = t.gather(1, block)                                                       # (B, L) each position's ratio
    masked = batch.window & (torch.rand(B, L, generator=gen) < t_at)                # (B, L)
    noisy = batch.ids.masked_fill(masked, adapter.mask_id)
    c = module.config
    inputs = two_copy_block_inputs(batch.attn, c.rotary_dim, c.rope_theta, bl)
    h = module.hidden(torch.cat([noisy, batch.ids], dim=1), inputs)                 # (B, 2L, C)
    logits = module.head(h[:, :L])                                                  # noisy copy only
    ce = F.cross_entropy(logits[masked].float(), batch.ids[masked], reduction="none")  # (M,)
    return (ce / t_at[masked]).sum() / batch.window.sum()


def training_loss(adapter: NativeAdapter, batch: Batch, gen: torch.Generator) -> torch.Tensor:
    """The family's objective: block diffusion for block-causal models, else masked diffusion."""
    if adapter.block_length is not None:
        return block_diffusion_loss(adapter, batch, gen)
    return diffusion_loss(adapter, batch, gen)


class ExpertLoad:
    """Counts the tokens each router sends to each expert, and nudges the expert biases to even them
    out (DeepSeek-V3's auxiliary-loss-free balancing, which LLaDA2 trains with)."""

    def __init__(self, module: torch.nn.Module, rate: float) -> None:
        self.rate = rate
        self.routers = [m for m in module.modules() if isinstance(m, Router) and m.expert_bias is not None]
        self.counts = [torch.zeros(r.spec.n_experts) for r in self.routers]
        self.hooks = [router.register_forward_hook(self._hook(i)) for i, router in enumerate(self.routers)]

    def _hook(self, i: int):
        def count(module: torch.nn.Module, args: tuple, out: tuple[torch.Tensor, torch.Tensor]) -> None:
            if module.training:
                self.counts[i] += torch.bincount(out[0].flatten(), minlength=len(self.counts[i]))
        return count

    @torch.no_grad()
    def step(self) -> None:
        """Raise the bias of under-loaded experts, lower the over-loaded ones; reset the counts."""
        for router, load in zip(self.routers, self.counts):
            router.expert_bias += self.rate * torch.sign(load.mean() - load)
            load.zero_()

    def close(self) -> None:
        """Detach the counting hooks."""
        for hook in self.hooks:
            hook.remove()


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine from lr down to final_lr_frac * lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    floor = cfg.final_lr_frac
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def save_copy(module: torch.nn.Module, tokenizer, out: str | Path, dtype: torch.dtype) -> Path:
    """save_model of a copy cast to dtype (the training module keeps its fp32 weights)."""
    name = f"tiny-{module.config.family}"
    return save_model(copy.deepcopy(module).to(dtype), tokenizer, out, extra_config={"_name_or_path": name})


def train(adapter: NativeAdapter, cfg: TrainConfig, log_every: int = 50,
          save_every: int = 0, save_dir: str | Path | None = None) -> list[dict]:
    """Run cfg.steps optimiser steps on fresh training-split examples; returns the loss log.

    With save_every > 0, an fp32 snapshot goes to save_dir every save_every steps (to watch a long run).
    """
    module = adapter.module.train()
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    balance = ExpertLoad(module, cfg.bias_rate)
    rng, gen = random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    tasks = [(get_task(name), n) for name, n in cfg.batch]
    log, start = [], time.perf_counter()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        losses = {}
        opt.zero_grad(set_to_none=True)
        for task, n in tasks:
            examples = [task.sample(rng, "train") for _ in range(n)]
            # Varied EOS padding: the model then decodes any gen_length up to max_window, not only
            # the task budget's (the pipeline runs every task with one gen_length).
            windows = [rng.randint(task.max_answer_len + 1, cfg.max_window) for _ in examples]
            batch = encode_batch(adapter, task, examples, windows)
            loss = training_loss(adapter, batch, gen)
            loss.backward()
            losses[task.name] = round(float(loss.detach()), 4)
        torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.clip)
        opt.step()
        balance.step()
        if step % log_every == 0 or step == cfg.steps - 1:
            entry = {"step": step, "seconds": round(time.perf_counter() - start, 1), **losses}
            log.append(entry)
            print(json.dumps(entry), flush=True)
        if save_every and save_dir and (step + 1) % save_every == 0:
            save_copy(module, adapter.tokenizer, save_dir, torch.float32)
    balance.close()
    module.eval()
    return log


def heldout_accuracy(model_dir: Path, task_names: Sequence[str], n: int) -> dict:
    """Full and one-shot accuracy of the SAVED model (reloaded from disk) on n test prompts per task.

    A block-diffusion model decodes on the block host, which has no EOS demotion (its rows stop after
    the first block holding EOS instead); its one-shot is one step per block.
    """
    model = load_model(model_dir)
    out = {}
    for name in task_names:
        task = get_task(name)
        examples = task.examples("test", task.available("test", n), seed=0)
        if model.block_length is not None:
            full = task_config(model, task, confidence_eos_eot_inf=False)
            fast = replace(full, steps=full.gen_length // model.block_length)
            out[name] = {"n": len(examples), "full": run_task(model, task, examples, full).accuracy,
                         "one_step_per_block": run_task(model, task, examples, fast).accuracy}
            continue
        full = task_config(model, task)
        out[name] = {"n": len(examples), "full": run_task(model, task, examples, full).accuracy,
                     "one_shot": run_task(model, task, examples, replace(full, steps=1)).accuracy}
    return out


def _initial(path: str, cfg: TrainConfig) -> torch.nn.Module:
    """The fp32 module of a saved model of cfg's family, to continue training from."""
    module = load_model(path).module
    if module.config.family != cfg.family:
        raise SystemExit(f"--init {path} holds a {module.config.family} model, not {cfg.family}")
    return module


def parse_batch(spec: str) -> tuple[tuple[str, int], ...]:
    """'sudoku4=128,running_parity=64' -> ((name, n), ...); a bare '32' means 32 for every task."""
    if spec.isdigit():
        return tuple((name, int(spec)) for name in TASKS)
    pairs = [item.split("=") for item in spec.split(",")]
    if not all(len(p) == 2 and p[0] in TASKS and p[1].isdigit() for p in pairs):
        raise SystemExit(f"--batch {spec!r}: give N or TASK=N,... with tasks from {sorted(TASKS)}")
    return tuple((name, int(n)) for name, n in pairs)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", choices=("llada", "dream", "llada2"), required=True)
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--batch", default=",".join(f"{k}={v}" for k, v in TrainConfig.batch),
                   help="examples per step: TASK=N,... (the tasks trained) or one N for every task")
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--max-window", type=int, default=TrainConfig.max_window,
                   help="longest generation window trained (answer + EOS padding)")
    p.add_argument("--warmup", type=int, default=TrainConfig.warmup, help="linear warm-up steps")
    p.add_argument("--threads", type=int, default=TrainConfig.threads, help="torch intra-op threads")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="dtype of the saved weights")
    p.add_argument("--save-every", type=int, default=0, help="also write an fp32 snapshot to "
                   "OUT/snapshot every N steps (0 = never)")
    p.add_argument("--eval-n", type=int, default=500, help="held-out test prompts per task for the final "
                   "full-decoding accuracy (0 = skip)")
    p.add_argument("--init", help="continue from this saved model's weights (same family; an fp32 snapshot "
                   "keeps them exact) with a fresh warm-up and cosine over --steps")
    p.add_argument("--lr", type=float, default=TrainConfig.lr, help="peak learning rate")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Train, save with save_model, reload from disk and record the held-out accuracy."""
    args = parse_args(argv)
    cfg = TrainConfig(family=args.family, steps=args.steps, batch=parse_batch(args.batch), seed=args.seed,
                      warmup=args.warmup, max_window=args.max_window, threads=args.threads, lr=args.lr)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tokenizer = char_tokenizer()
    module = build_module(cfg, tokenizer.vocab_size, max_length=128) if not args.init else _initial(args.init, cfg)
    adapter = NativeAdapter(module, tokenizer, name=f"tiny-{cfg.family}")
    params = sum(p.numel() for p in module.parameters())
    print(f"tiny-{cfg.family}: {params:,} parameters, {cfg.steps} steps, {cfg.threads} thread(s)", flush=True)
    start = time.perf_counter()
    log = train(adapter, cfg, save_every=args.save_every, save_dir=Path(args.out) / "snapshot")
    seconds = time.perf_counter() - start
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    out = save_copy(module, tokenizer, args.out, dtype)
    record = {"command": "jobs/train_tiny.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "config": cfg.__dict__, "parameters": params, "train_seconds": round(seconds, 1),
              "saved_dtype": args.dtype, "final_loss": log[-1], "torch": torch.__version__,
              **({"init": args.init} if args.init else {})}
    if args.eval_n:
        record["heldout_accuracy"] = heldout_accuracy(out, [name for name, _ in cfg.batch], args.eval_n)
    (Path(out) / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
