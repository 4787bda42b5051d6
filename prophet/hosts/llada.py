"""LLaDA's host: semi-autoregressive blocks, a fixed number of commits per step (SPEC section 1.1)."""
from __future__ import annotations

import torch

from prophet.hosts.window import WindowHost, _Plan
from prophet.rules import Proposal
from prophet.schedules import llada_schedule


class LLaDAHost(WindowHost):
    """Commit n0 // S per step (the first n0 % S steps one more), n0 = the block's masks at entry,
    ranked by confidence (low_confidence) or by uniforms (random)."""

    name = "llada"

    def schedule(self, plan: _Plan, t: dict[str, torch.Tensor], prop: Proposal, n: torch.Tensor,
                 sstep: torch.Tensor, position_u: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """LLaDA's key, k and no forced reveal."""
        key = prop.score if plan.cfg.remasking == "low_confidence" else position_u
        n0 = plan.block_n0[t["block"].clamp(max=plan.nb - 1)]
        return key, llada_schedule(n0, plan.S).gather(1, sstep[:, None])[:, 0], None
