"""Choose Prophet's thresholds, region and statistic for one model on a validation split.

Thresholds are in logit units and their scale differs per model, so they are searched. The
search is exact and cheap: until Prophet commits, its trajectory IS Full decoding's (the rule
runs before each step's normal update and changes nothing when it does not fire). So one traced
Full run, recording at every step each row's window, top-2 gaps and argmax, tells for any
(thresholds, region, statistic) at which step a row would go all in and what it would write.
Thousands of settings are scored from that trace; the chosen one is then run for real through
`prophet.decode` and only a setting that passes for real is kept.

The block host (`decoding.host: block`) is calibrated differently: after Prophet fills a block the
row decodes its next block from that fill, not from Full's, so the trace no longer predicts the
rest of the row. There every setting of a smaller grid (BLOCK_LEVELS x BLOCK_SHAPES x
BLOCK_STATISTICS) is run for real; a tiny model decodes a validation split in seconds.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from prophet.config import DecodeConfig
from prophet.rules import pool_gaps, top2_gap
from prophet.schedules import prophet_tau
from prophet.tasks.base import Example, Task
from prophet.tasks.evaluation import Outcome, half, run_task, task_config
from prophet.types import TextDLM

# Low threshold a (logit units) and shape d: thresholds (a + 2d, a + d, a) over the first,
# middle and last third of the budget. A structured family rather than every triple, so the
# choice does not overfit the validation prompts.
LEVELS: tuple[float, ...] = tuple(x / 4 for x in range(1, 81))   # 0.25 .. 20
SHAPES: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 3.0)
# (statistic, quantile) pairs; the quantile matters only for "quantile".
STATISTICS: tuple[tuple[str, float], ...] = (("mean", 0.1), ("min", 0.1), ("quantile", 0.1), ("quantile", 0.25))
# Decoding fields the thresholds were chosen under (recorded in the file; apply them too).
HOST_FIELDS = ("host", "gen_length", "steps", "block_length", "remasking", "alg", "temperature",
               "confidence_eos_eot_inf", "progress")


# The block host's grid, every setting decoded for real (see the module docstring).
BLOCK_LEVELS: tuple[float, ...] = tuple(x / 2 for x in range(1, 25))  # 0.5 .. 12
BLOCK_SHAPES: tuple[float, ...] = (0.0, 1.0)
BLOCK_STATISTICS: tuple[tuple[str, float], ...] = (("mean", 0.1), ("min", 0.1))


@dataclass(frozen=True)
class Candidate:
    """One Prophet setting of the sweep."""

    region: str
    statistic: str
    quantile: float
    shape: float
    level: float
    parallel: str = "none"        # block host: Prophet's normal update ('confidence_threshold' on top)
    confidence: float | None = None

    @property
    def thresholds(self) -> tuple[float, float, float]:
        """(tau_high, tau_mid, tau_low)."""
        return (self.level + 2 * self.shape, self.level + self.shape, self.level)

    def decode_fields(self) -> dict:
        """The calibration file's 'decode' dict (what DecodeConfig.with_calibration reads)."""
        out = {"rule": "prophet", "thresholds": list(self.thresholds), "region": self.region,
               "statistic": self.statistic, "quantile": self.quantile}
        if self.parallel != "none":
            out |= {"parallel": self.parallel, "confidence": self.confidence}
        return out


class TracingModel:
    """A DLM that forwards to `inner` and records, per forward pass and row, the window state.

    Records (prompt key, canvas (G,), top-2 gaps (G,), argmax (G,)) where the prompt key is the
    row's real prompt tokens, so rows are matched to prompts whatever the batch layout.
    """

    def __init__(self, inner: TextDLM, gen_length: int) -> None:
        self.inner, self.gen_length = inner, gen_length
        self.steps: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def logits(self, ids: torch.Tensor, attention_mask: torch.Tensor | None, last: int | None = None) -> torch.Tensor:
        """The inner model's logits, recorded on the way."""
        out = self.inner.logits(ids, attention_mask, last)
        G = self.gen_length
        lw = out[:, -G:].float()                                      # (B, G, V), as the decoder sees it
        gaps, top = top2_gap(lw).cpu(), lw.argmax(-1).cpu()           # (B, G) each
        canvas = ids[:, -G:].cpu()
        real_mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        for i, (row, real) in enumerate(zip(ids[:, :-G].cpu(), real_mask[:, :-G].cpu())):
            key = tuple(row[real].tolist())
            self.steps.setdefault(key, []).append((canvas[i], gaps[i], top[i]))
        return out


@dataclass
class Trace:
    """Full decoding of N prompts, step by step."""

    full: Outcome               # the real Full run
    masked: torch.Tensor        # (N, S, G) bool, still-masked window positions before step s
    gaps: torch.Tensor          # (N, S, G) float32 top-2 logit gaps at step s
    fill_correct: torch.Tensor  # (N, S) bool: going all in at step s would score correct
    steps: int                  # the step budget S


def trace_full(model: TextDLM, task: Task, examples: Sequence[Example], config: DecodeConfig) -> Trace:
    """Run Full decoding through a TracingModel and score the all-in fill of every step."""
    if config.num_blocks != 1:
        raise ValueError("the traced sweep covers single-block budgets (region 'block' = 'window'); "
                         f"{task.name} has {config.num_blocks} blocks")
    tracer = TracingModel(model, config.gen_length)
    full = run_task(tracer, task, examples, config)  # type: ignore[arg-type]
    stops = {model.eos_id} | ({model.eot_id} if model.eot_id is not None else set())
    masked, gaps, correct = [], [], []
    for ex in examples:
        rec = tracer.steps[tuple(model.encode(ex.prompt))]
        canvas = torch.stack([c for c, _, _ in rec])                    # (S, G)
        top = torch.stack([t for _, _, t in rec])                       # (S, G)
        m = canvas == model.mask_id
        fills = torch.where(m, top, canvas).tolist()
        correct.append([task.score(ex.prompt, model.decode(_before_stop(f, stops))) for f in fills])
        masked.append(m)
        gaps.append(torch.stack([g for _, g, _ in rec]))
    S = max(len(c) for c in correct)
    if any(len(c) != S for c in correct):
        raise RuntimeError("rows of a Full run took different numbers of steps; cannot trace them together")
    return Trace(full, torch.stack(masked), torch.stack(gaps), torch.tensor(correct), config.steps)


def _before_stop(tokens: list[int], stops: set[int]) -> list[int]:
    return next((tokens[:i] for i, t in enumerate(tokens) if t in stops), tokens)


def pooled_gaps(trace: Trace, statistic: str, quantile: float) -> torch.Tensor:
    """(N, S) pooled gap G of each row at each step over its still-masked window positions."""
    N, S, G = trace.gaps.shape
    flat = pool_gaps(trace.gaps.reshape(N * S, G), trace.masked.reshape(N * S, G), statistic, quantile)
    return flat.reshape(N, S)


def simulate(trace: Trace, pooled: torch.Tensor, thresholds: tuple[float, float, float]) -> tuple[float, float]:
    """(accuracy, mean steps) of Prophet with these thresholds, from the trace."""
    N, S = pooled.shape
    tau = prophet_tau(torch.arange(S), trace.steps, thresholds)              # (S,)
    fire = pooled.double() >= tau[None, :]                                    # (N, S); NaN never fires
    fired = fire.any(1)
    first = torch.where(fired, fire.long().argmax(1), S - 1)                 # (N,) 0-based commit step
    full_ok = torch.tensor(trace.full.correct)
    ok = torch.where(fired, trace.fill_correct.gather(1, first[:, None])[:, 0], full_ok)
    used = torch.where(fired, first + 1, torch.tensor(trace.full.steps))
    return float(ok.double().mean()), float(used.double().mean())


def sweep(trace: Trace, region: str = "window") -> list[tuple[Candidate, float, float]]:
    """Every candidate of the grid with its simulated (accuracy, mean steps)."""
    rows = []
    for stat, q in STATISTICS:
        pooled = pooled_gaps(trace, stat, q)
        for shape in SHAPES:
            for level in LEVELS:
                cand = Candidate(region, stat, q, shape, level)
                rows.append((cand, *simulate(trace, pooled, cand.thresholds)))
    return rows


def ranked(rows: Sequence[tuple[Candidate, float, float]], floor: float) -> list[tuple[Candidate, float, float]]:
    """Passing candidates, fewest steps first (ties: higher accuracy, then higher thresholds)."""
    ok = [r for r in rows if r[1] >= floor]
    return sorted(ok, key=lambda r: (round(r[2], 9), -r[1], tuple(-t for t in r[0].thresholds)))


def best_per_group(rows: Sequence[tuple[Candidate, float, float]], floor: float) -> list[tuple[Candidate, float, float]]:
    """For each (statistic, shape), the fastest passing candidate (the people-readable table)."""
    best: dict[tuple, tuple[Candidate, float, float]] = {}
    for r in ranked(rows, floor):
        best.setdefault((r[0].statistic, r[0].quantile, r[0].shape), r)
    return list(best.values())


def accuracy_floor(full: float, tolerance: float, half: float | None = None, n: int = 1) -> float:
    """Least accuracy a setting may have: Full's minus `tolerance` points and, when Half's accuracy
    is given, strictly above it (at least one more of the n prompts right)."""
    floor = full - tolerance / 100 - 1e-12  # the epsilon keeps "equal to the floor" passing
    return floor if half is None else max(floor, half + 0.5 / n)


def calibrate(model: TextDLM, task: Task, examples: Sequence[Example], tolerance: float = 0.5,
              log: Callable[[str], None] = print, max_verify: int = 5, beat_half: bool = True,
              temperature: float = 0.0, region: str = "block", parallel: str = "none",
              confidence: float = 0.95) -> dict:
    """Sweep on `examples` and return the calibration file's dict (decode fields + validation table).

    tolerance is in accuracy points (0.5 = half a percentage point below Full). beat_half: the
    setting must also be more accurate than Half (half the steps), the paper's comparison; a
    setting that is not is no better than halving the budget. temperature > 0 fits on sampled paths:
    the trace still holds, as each row's noise comes from its seed and Prophet's all-in fill is the argmax.
    region, parallel and confidence (Prophet's normal update: the threshold rule on top) apply to the
    block host only (`calibrate_block`); the other hosts sweep region 'window' with their schedule.
    """
    full_cfg = task_config(model, task, temperature=temperature)
    if full_cfg.host == "block":
        return calibrate_block(model, task, examples, tolerance, log, beat_half, temperature, region, parallel,
                               confidence)
    trace = trace_full(model, task, examples, full_cfg)
    full = trace.full
    halved = run_task(model, task, examples, half(full_cfg)) if beat_half else None
    floor = accuracy_floor(full.accuracy, tolerance, halved.accuracy if halved else None, full.n)
    log(f"full: accuracy {full.accuracy:.4f} over {full.n} prompts"
        + (f"; half: {halved.accuracy:.4f}" if halved else "") + f"; floor {floor:.4f}")
    rows = sweep(trace)
    table = []
    for cand, acc, steps in best_per_group(rows, floor):
        log(f"simulated {cand.statistic} q{cand.quantile:g} {cand.thresholds}: accuracy {acc:.4f} steps {steps:.2f}")
        table.append({"decode": cand.decode_fields(), "accuracy": round(acc, 4), "mean_steps": round(steps, 4),
                      "speedup": round(full.mean_steps / steps, 4)})  # against Full's measured steps
    for cand, acc, steps in ranked(rows, floor)[:max_verify]:
        real = run_task(model, task, examples, replace(full_cfg, **cand.decode_fields()))
        log(f"verified {real.rule}: accuracy {real.accuracy:.4f} (simulated {acc:.4f}) steps "
            f"{real.mean_steps:.2f} (simulated {steps:.2f})")
        if real.accuracy >= floor:
            host = {k: full_cfg.to_dict()[k] for k in HOST_FIELDS}
            return {"decode": cand.decode_fields(), "model": model.name, "task": task.name,
                    "calibrated_with": host,
                    "validation": {"split": "valid", "n": full.n, "tolerance_points": tolerance,
                                   "beat_half": beat_half, "floor": round(floor, 6),
                                   "settings_simulated": len(rows), "full": full.row(model.name, task.name),
                                   "half": halved.row(model.name, task.name) if halved else None,
                                   "chosen": real.row(model.name, task.name),
                                   "chosen_simulated": {"accuracy": round(acc, 4), "mean_steps": round(steps, 4)},
                                   "best_per_statistic_and_shape": table}}
    beat = f" and above Half ({halved.accuracy:.4f})" if halved else ""
    raise RuntimeError(f"no Prophet setting kept accuracy within {tolerance} points of Full "
                       f"({full.accuracy:.4f}){beat} on {task.name}: raise the tolerance"
                       + (", or drop the Half condition (--no-beat-half)" if halved else "")
                       + ", or widen LEVELS")


def calibrate_block(model: TextDLM, task: Task, examples: Sequence[Example], tolerance: float = 0.5,
                    log: Callable[[str], None] = print, beat_half: bool = True, temperature: float = 0.0,
                    region: str = "block", parallel: str = "none", confidence: float = 0.95) -> dict:
    """`calibrate` for the block host: every grid setting decoded for real, the fewest mean steps that
    pass the floor kept (ties: fewer forward tokens, then higher accuracy). Same file format;
    `validation.settings_run` replaces `settings_simulated`."""
    full_cfg = task_config(model, task, temperature=temperature)
    full = run_task(model, task, examples, full_cfg)
    halved = run_task(model, task, examples, half(full_cfg)) if beat_half else None
    floor = accuracy_floor(full.accuracy, tolerance, halved.accuracy if halved else None, full.n)
    log(f"full: accuracy {full.accuracy:.4f} over {full.n} prompts"
        + (f"; half: {halved.accuracy:.4f}" if halved else "") + f"; floor {floor:.4f}")
    conf = confidence if parallel != "none" else None
    runs = []
    for stat, q in BLOCK_STATISTICS:
        for shape in BLOCK_SHAPES:
            for level in BLOCK_LEVELS:
                cand = Candidate(region, stat, q, shape, level, parallel, conf)
                runs.append((cand, run_task(model, task, examples, replace(full_cfg, **cand.decode_fields()))))
    order = lambda r: (round(r[1].mean_steps, 9), r[1].mean_forward_tokens, -r[1].accuracy)  # noqa: E731
    passing = sorted((r for r in runs if r[1].accuracy >= floor), key=order)
    if not passing:
        beat = f" and above Half ({halved.accuracy:.4f})" if halved else ""
        top = max(runs, key=lambda r: (r[1].accuracy, -r[1].mean_steps))[1]
        raise RuntimeError(f"no Prophet setting kept accuracy within {tolerance} points of Full "
                           f"({full.accuracy:.4f}){beat} on {task.name} (the most accurate of {len(runs)}: "
                           f"{top.rule}, {top.accuracy:.4f} at {top.mean_steps:.2f} steps): raise the tolerance"
                           + (", or drop the Half condition (--no-beat-half)" if halved else "")
                           + ", or widen BLOCK_LEVELS")
    best: dict[tuple, tuple[Candidate, Outcome]] = {}
    for r in passing:
        best.setdefault((r[0].statistic, r[0].quantile, r[0].shape), r)
    table = [{"decode": c.decode_fields(), "accuracy": round(o.accuracy, 4), "mean_steps": round(o.mean_steps, 4),
              "mean_forward_tokens": round(o.mean_forward_tokens, 2),
              "speedup": round(full.mean_steps / o.mean_steps, 4)} for c, o in best.values()]
    cand, chosen = passing[0]
    log(f"chosen {chosen.rule}: accuracy {chosen.accuracy:.4f} steps {chosen.mean_steps:.2f} "
        f"forward tokens {chosen.mean_forward_tokens:.1f} ({len(runs)} settings run)")
    host = {k: full_cfg.to_dict()[k] for k in HOST_FIELDS}
    return {"decode": cand.decode_fields(), "model": model.name, "task": task.name, "calibrated_with": host,
            "validation": {"split": "valid", "n": full.n, "tolerance_points": tolerance, "beat_half": beat_half,
                           "floor": round(floor, 6), "settings_run": len(runs),
                           "full": full.row(model.name, task.name),
                           "half": halved.row(model.name, task.name) if halved else None,
                           "chosen": chosen.row(model.name, task.name),
                           "best_per_statistic_and_shape": table}}
