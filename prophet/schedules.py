"""Host step schedules as small pure tensor functions: how many tokens a step commits, and when.

Every function takes per-row tensors, so one call serves a whole batch whose rows sit at
different steps (continuous batching); a single row is the batch-of-one case.
"""
from __future__ import annotations

import torch


def llada_schedule(n: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA tokens per step: (B,) masked counts -> (B, steps); n // S each, the first n % S get one more."""
    base, extra = n // steps, n % steps  # (B,)
    first = torch.arange(steps, device=n.device) < extra[:, None]  # (B, S)
    return base[:, None] + first.long()


def dream_timesteps(steps: int, eps: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Dream's schedule ts = linspace(1, eps, steps + 1) in float32, as the reference computes it."""
    return torch.linspace(1.0, eps, steps + 1, device=device)


def dream_transfer_fraction(i: torch.Tensor, steps: int, eps: float) -> torch.Tensor:
    """Fraction of masked positions revealed at step i (B,): 1 - ts[i+1] / ts[i]; 1 at the last step."""
    ts = dream_timesteps(steps, eps, i.device)
    frac = 1 - ts[i + 1] / ts[i]  # float32, (B,)
    return torch.where(i >= steps - 1, torch.ones_like(frac), frac)


def dream_schedule(n: torch.Tensor, i: torch.Tensor, steps: int, eps: float) -> torch.Tensor:
    """Dream tokens to commit at step i for rows with n masked positions: int(n * (1 - t_s/t_i)), all at the end.

    n is each row's own current mask count (the reference averages it over the batch, which can
    re-mask committed tokens when rows differ).
    """
    ts = dream_timesteps(steps, eps, n.device)
    k = (n * (1 - ts[i + 1] / ts[i])).long()  # int64 x float32 -> float32, truncated like int()
    return torch.where(i >= steps - 1, n, k)


def prophet_tau(position: torch.Tensor, steps: int, thresholds: tuple[float, float, float],
                progress: str = "exact") -> torch.Tensor:
    """tau(p) (B,) for rows that consumed `position` schedule steps (0-based index of this step), float64.

    "exact": p = position / steps, high below 1/3, mid below 2/3, low after, compared in integers
    (3 * position < steps) so that p exactly at a third is never rounded to the wrong side.
    "reference": Prophet's generate_earlyexit, p = (position + 1) / steps against 0.33 and 0.67
    in float64 (the paper's thresholds were tuned with it; it drops a threshold one step earlier
    at T = 24, 32 or 256, for example). Float64 so that a gap meets the threshold exactly as written.
    """
    high, mid, low = thresholds
    if progress == "reference":
        p = (position + 1).double() / steps
        tau = torch.where(p < 0.33, high, torch.where(p < 0.67, mid, low))
        return tau.to(torch.float64)
    third = 3 * position
    tau = torch.where(third < steps, high, torch.where(third < 2 * steps, mid, low))
    return tau.to(torch.float64)
