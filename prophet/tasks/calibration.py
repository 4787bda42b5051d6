"""Choose Prophet's thresholds, region and statistic for one model on a validation split.

Thresholds are in logit units and their scale differs per model, so they are searched, not
assumed: for each (region, statistic, shape) a bisection over threshold levels finds the lowest
level (the earliest commits) whose accuracy stays within the tolerance of Full decoding. Only
settings that were actually run are ever chosen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from prophet.config import DecodeConfig
from prophet.tasks.base import Example, Task
from prophet.tasks.evaluation import Outcome, run_task, task_config
from prophet.types import TextDLM

# Threshold levels a (logit units), ascending: the low threshold tau_low of a setting.
LEVELS: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 16.0, 20.0)
# Shapes d: thresholds (a + 2d, a + d, a) over the first, middle and last third of the budget.
SHAPES: tuple[float, ...] = (0.0, 1.0, 2.5)
# (statistic, quantile) pairs; the quantile matters only for "quantile".
STATISTICS: tuple[tuple[str, float], ...] = (("mean", 0.1), ("min", 0.1), ("quantile", 0.1), ("quantile", 0.25))


@dataclass(frozen=True)
class Candidate:
    """One Prophet setting of the sweep."""

    region: str
    statistic: str
    quantile: float
    shape: float
    level: float

    @property
    def thresholds(self) -> tuple[float, float, float]:
        """(tau_high, tau_mid, tau_low)."""
        return (self.level + 2 * self.shape, self.level + self.shape, self.level)

    def decode_fields(self) -> dict:
        """The calibration file's 'decode' dict (what DecodeConfig.with_calibration reads)."""
        return {"rule": "prophet", "thresholds": list(self.thresholds), "region": self.region,
                "statistic": self.statistic, "quantile": self.quantile}


def regions_for(config: DecodeConfig) -> tuple[str, ...]:
    """Regions worth sweeping: 'block' equals 'window' when the window is a single block."""
    return ("window",) if config.num_blocks == 1 else ("window", "block")


def lowest_passing(levels: Sequence[float], passes: Callable[[float], bool]) -> None | float:
    """Bisection for the lowest level that passes, assuming passing is monotone in the level.

    Returns None when even the highest level fails. Each level is tried at most once.
    """
    lo, hi, best = 0, len(levels) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if passes(levels[mid]):
            best, hi = levels[mid], mid - 1
        else:
            lo = mid + 1
    return best


def choose(rows: Sequence[tuple[Candidate, Outcome]], floor: float) -> tuple[Candidate, Outcome] | None:
    """The passing setting with the largest speed-up (ties: higher accuracy, then higher thresholds)."""
    ok = [(c, o) for c, o in rows if o.accuracy >= floor]
    if not ok:
        return None
    return max(ok, key=lambda co: (round(co[1].speedup, 9), co[1].accuracy, co[0].thresholds))


def calibrate(model: TextDLM, task: Task, examples: Sequence[Example], tolerance: float = 0.5,
              log: Callable[[str], None] = print) -> dict:
    """Sweep on `examples` and return the calibration file's dict (decode fields + validation table).

    tolerance is in accuracy points (0.5 = half a percentage point below Full).
    """
    full_cfg = task_config(model, task)
    full = run_task(model, task, examples, full_cfg)
    floor = full.accuracy - tolerance / 100 - 1e-12  # the epsilon keeps "equal to the floor" passing
    log(f"full: accuracy {full.accuracy:.4f} over {full.n} prompts; floor {floor:.4f}")
    rows: list[tuple[Candidate, Outcome]] = []

    def passes_for(region: str, stat: str, q: float, shape: float) -> Callable[[float], bool]:
        def passes(level: float) -> bool:
            cand = Candidate(region, stat, q, shape, level)
            out = run_task(model, task, examples, task_config(model, task, **cand.decode_fields()))
            rows.append((cand, out))
            log(f"{out.rule}: accuracy {out.accuracy:.4f} steps {out.mean_steps:.2f} ({out.speedup:.2f}x)")
            return out.accuracy >= floor
        return passes

    for region in regions_for(full_cfg):
        for stat, q in STATISTICS:
            for shape in SHAPES:
                lowest_passing(LEVELS, passes_for(region, stat, q, shape))
    picked = choose(rows, floor)
    if picked is None:
        raise RuntimeError(f"no Prophet setting kept accuracy within {tolerance} points of Full "
                           f"({full.accuracy:.4f}) on {task.name}: raise the tolerance or the levels")
    best, out = picked
    return {"decode": best.decode_fields(), "model": model.name, "task": task.name,
            "validation": {"split": "valid", "n": full.n, "tolerance_points": tolerance,
                           "full": full.row(model.name, task.name), "chosen": out.row(model.name, task.name),
                           "table": [o.row(model.name, task.name) for _, o in rows]}}
