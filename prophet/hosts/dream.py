"""Dream's host: the eps schedule within each block (SPEC section 1.2)."""
from __future__ import annotations

import torch

from prophet.hosts.window import WindowHost, _Plan
from prophet.rules import Proposal, gumbel_perturb
from prophet.schedules import dream_schedule, dream_transfer_fraction


class DreamHost(WindowHost):
    """Commit int(n * (1 - t_s / t_i)) per step (all at the last), ranked by the alg's confidence
    (or sampled with alg_temp); `origin` reveals each candidate independently."""

    name = "dream"

    def schedule(self, plan: _Plan, t: dict[str, torch.Tensor], prop: Proposal, n: torch.Tensor,
                 sstep: torch.Tensor, position_u: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Dream's key, k and (origin) forced reveals."""
        cfg = plan.cfg
        if cfg.alg == "origin":
            reveal = position_u < dream_transfer_fraction(sstep, plan.S, cfg.eps)[:, None]
            return -position_u, torch.zeros_like(n), reveal
        key = prop.score if cfg.alg_temp <= 0 else gumbel_perturb(prop.score, position_u, cfg.alg_temp)
        return key, dream_schedule(n, sstep, plan.S, cfg.eps), None
