"""Decode a task's prompts with a model and score them: accuracy, steps used, speed-up."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from prophet.config import DecodeConfig
from prophet.tasks.base import Example, Task
from prophet.types import TextDLM


@dataclass(frozen=True)
class Outcome:
    """One (model, task, rule) evaluation."""

    rule: str                  # label: which rule, thresholds, region and statistic
    accuracy: float            # fraction of prompts scored correct
    mean_steps: float          # mean forward passes per prompt
    budget: int                # Full decoding's step budget (the speed-up's numerator)
    n: int                     # prompts
    correct: tuple[bool, ...]  # per prompt, in input order
    steps: tuple[int, ...]     # per prompt forward passes
    forward_tokens: tuple[int, ...] = ()  # per prompt positions sent through the model

    @property
    def mean_forward_tokens(self) -> float:
        """Mean positions per prompt sent through the model (the cost a cache cuts)."""
        return sum(self.forward_tokens) / max(1, len(self.forward_tokens))

    @property
    def speedup(self) -> float:
        """Step speed-up against the Full budget."""
        return self.budget / self.mean_steps

    def row(self, model: str, task: str) -> dict:
        """The JSON row of jobs/evaluate.py."""
        return {"model": model, "task": task, "rule": self.rule, "accuracy": round(self.accuracy, 4),
                "mean_steps": round(self.mean_steps, 4), "budget": self.budget,
                "speedup": round(self.speedup, 4), "n": self.n,
                "mean_forward_tokens": round(self.mean_forward_tokens, 2)}


def task_config(model: TextDLM, task: Task, **overrides) -> DecodeConfig:
    """Full decoding of `task` on the model's own host schedule, with any field overridden."""
    b = task.budget
    host = overrides.pop("host", model.default_host)
    block = b.block_length if host == "llada" else None
    fields = {"host": host, "gen_length": b.gen_length, "steps": b.steps, "block_length": block,
              "confidence_eos_eot_inf": b.eos_last and host != "block", "batch_size": 128}  # block: no demotion
    return DecodeConfig(**{**fields, **overrides})


def rule_label(config: DecodeConfig, full_steps: int) -> str:
    """Human and machine readable name of a decoding setting, e.g. 'prophet 8/5/3 window min'."""
    steps = "" if config.steps == full_steps else f" @{config.steps} steps"
    cache = "" if config.cache == "none" else f" [{config.cache} cache, blocks of {config.block_length}]"
    return _rule_name(config, full_steps, steps) + cache


def _rule_name(config: DecodeConfig, full_steps: int, steps: str) -> str:
    if config.rule == "full":
        return {full_steps: "full", full_steps // 2: "half", 1: "one-shot"}.get(config.steps, f"full{steps}")
    if config.rule == "confidence_threshold":
        return f"confidence_threshold p>{config.confidence:g}{steps}"
    th = "/".join(f"{t:g}" for t in config.thresholds)
    stat = config.statistic if config.statistic != "quantile" else f"q{config.quantile:g}"
    if config.rule == "gap_parallel":
        return f"gap_parallel {th}{steps}"
    return f"prophet {th} {config.region} {stat}{steps}"


def completions(model: TextDLM, tokens: torch.Tensor, num_generated: torch.Tensor) -> list[str]:
    """(N, G) generated windows -> the text of each before its first EOS/EoT."""
    return [model.decode(row[:n]) for row, n in zip(tokens.tolist(), num_generated.tolist())]


def run_task(model: TextDLM, task: Task, examples: Sequence[Example], config: DecodeConfig,
             label: str | None = None, seed: int = 0) -> Outcome:
    """Decode every example's prompt under `config` and score the completions."""
    from prophet.decode import decode  # the decoder imports lazily: tasks need no decoder

    prompts = [model.encode(ex.prompt) for ex in examples]
    res = decode(model, prompts, config, seeds=[seed + i for i in range(len(prompts))])
    texts = completions(model, res.tokens, res.num_generated)
    correct = tuple(task.score(ex.prompt, text) for ex, text in zip(examples, texts))
    steps = tuple(int(s) for s in res.steps_used.tolist())
    return Outcome(rule=label or rule_label(config, task.budget.steps), accuracy=sum(correct) / len(correct),
                   mean_steps=sum(steps) / len(steps), budget=task.budget.steps, n=len(correct),
                   correct=correct, steps=steps, forward_tokens=tuple(res.forward_tokens.tolist()))


def half(config: DecodeConfig) -> DecodeConfig:
    """Half: the same setting with half the steps, the paper's baseline for early commit."""
    return replace(config, steps=config.steps // 2)
