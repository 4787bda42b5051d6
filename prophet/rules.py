"""Commit rules, confidences and sampling as small pure tensor functions.

Shapes: B rows, C candidate positions per row (already sliced out of the window, so nothing here
touches positions that cannot change), V vocabulary entries. `valid` (B, C) marks real
candidates; padded slots carry arbitrary finite values and are never selected. Every function
is row-wise, so a row's result never depends on the other rows of a batch.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from prophet.config import DecodeConfig

# ---------------------------------------------------------------------------------------------
# Prophet: gap, pooling, decision


def top2_gap(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) raw logits -> (...,) top-1 minus top-2 logit, in float32."""
    top = logits.float().topk(2, dim=-1).values  # (..., 2)
    return top[..., 0] - top[..., 1]


def pool_gaps(gaps: torch.Tensor, valid: torch.Tensor, statistic: str, quantile: float = 0.1) -> torch.Tensor:
    """(B, C) gaps over a region mask -> (B,) pooled G (float32); NaN where the region is empty.

    The mean sums in float64 with a sequential cumulative sum, so a row gives the same bits
    whether its region sits in a padded batch or alone (padding adds exact zeros at the end).
    """
    n = valid.sum(-1)  # (B,)
    if gaps.shape[-1] == 0:
        return torch.full(n.shape, float("nan"), device=gaps.device)
    g = gaps.double()
    if statistic == "mean":
        out = torch.where(valid, g, 0.0).cumsum(-1)[..., -1] / n
    elif statistic == "min":
        out = torch.where(valid, g, float("inf")).amin(-1)
    elif statistic == "quantile":
        srt = torch.where(valid, g, float("inf")).sort(-1).values  # region values first, ascending
        rank = quantile * (n - 1).clamp(min=0).double()  # (B,) linear interpolation, as numpy's default
        lo, hi = rank.floor().long(), rank.ceil().long()
        v_lo, v_hi = srt.gather(-1, lo[..., None])[..., 0], srt.gather(-1, hi[..., None])[..., 0]
        out = v_lo + (rank - lo) * (v_hi - v_lo)
    else:
        raise ValueError(f"unknown statistic {statistic!r}")
    return torch.where(n > 0, out, float("nan")).float()


def prophet_decision(pooled: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """(B,) pooled gaps, (B,) thresholds -> (B,) bool: go all in where G >= tau (never on NaN).

    Compared in float64, so a float32 G meets a threshold such as 7.3 exactly as written.
    """
    return pooled.double() >= tau.double()


# ---------------------------------------------------------------------------------------------
# Candidate selection


def compact(mask: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, G) bool -> (idx, valid), each (B, width): the True positions first, in ascending order.

    Sync-free replacement for boolean indexing: a stable sort puts the selected positions at the
    front; rows with fewer than `width` of them get padded slots with valid False.
    """
    idx = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[:, :width]  # (B, width)
    valid = mask.gather(-1, idx)
    return idx, valid


def rank_desc(key: torch.Tensor, tier: torch.Tensor) -> torch.Tensor:
    """(B, C) key and tier -> (B, C) rank (0 = best) by tier, then key, descending; ties by position.

    Two stable sorts make a lexicographic order that never depends on the batch, unlike topk,
    whose order among ties is unspecified.
    """
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices  # (B, C)
    order = order.gather(-1, torch.sort(tier.gather(-1, order), dim=-1, descending=True, stable=True).indices)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return ranks


def select_positions(rank: torch.Tensor, valid: torch.Tensor, k: torch.Tensor,
                     extra: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C) rank, valid; (B,) k -> (B, C) bool: the k best valid positions plus any `extra` ones."""
    sel = rank < k[:, None]
    if extra is not None:
        sel = sel | extra
    return sel & valid


def budget_floor(remaining: torch.Tensor, steps_left: torch.Tensor) -> torch.Tensor:
    """Fewest commits that still empty `remaining` positions in `steps_left` steps: ceil(r / s)."""
    return (remaining + steps_left - 1) // steps_left.clamp(min=1)


def update_rule(cfg: DecodeConfig) -> str:
    """The rule of a step's normal update: the commit rule itself, or under Prophet its `parallel`
    companion ('none' = the host's schedule alone)."""
    return cfg.parallel if cfg.rule == "prophet" else cfg.rule


def parallel_commit(rule: str, cfg: DecodeConfig, k: torch.Tensor, floor: torch.Tensor, prop: "Proposal",
                    tau: torch.Tensor, demoted: torch.Tensor,
                    reveal: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A parallel rule on top of a host's schedule: (B,) k and (B, C) reveal -> the rule's (k, reveal).

    gap_parallel: also every position whose own gap reaches tau, at least max(k, floor).
    confidence_threshold: every position whose probability exceeds `confidence` (compared as
    log-probabilities in float64, the threshold as written), at least max(floor, 1), instead of
    the schedule (Fast-dLLM). Demoted positions (EOS/EoT under confidence_eos_eot_inf) never pass.
    """
    if rule == "gap_parallel":
        passing = (prop.gap.double() >= tau[:, None]) & ~demoted
        return torch.maximum(k, floor), passing if reveal is None else reveal | passing
    if rule == "confidence_threshold":
        return floor.clamp(min=1), above_confidence(prop.logp, cfg.confidence) & ~demoted
    return k, reveal


def above_confidence(logp: torch.Tensor, confidence: float) -> torch.Tensor:
    """(...,) float32 log-probabilities -> bool where the probability exceeds `confidence`."""
    return logp.double() > math.log(confidence)


# ---------------------------------------------------------------------------------------------
# Sampling and confidences


def cfg_mix(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: un + (scale + 1) * (cond - un)."""
    return uncond + (scale + 1) * (cond - uncond)


def gumbel_argmax(logits: torch.Tensor, u: torch.Tensor, temperature: float) -> torch.Tensor:
    """LLaDA's Gumbel-max, argmax exp(logits) / (-log U) ** T over V, taken in log space as
    argmax logits - T log(-log U) (the same argmax, without LLaDA's float64 copy); (..., V) -> (...,)."""
    return (logits.float() - temperature * torch.log(-torch.log(u))).argmax(-1)


def softmax_of(logits: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Softmax probability of token x0 (...,) under (..., V) logits (LLaDA's low_confidence)."""
    return torch.softmax(logits.float(), dim=-1).gather(-1, x0[..., None])[..., 0]


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Dream's nucleus filter: keep the smallest prefix whose probability reaches top_p (the rest -> min)."""
    srt, order = torch.sort(logits, dim=-1, descending=True)
    drop = torch.softmax(srt, dim=-1).cumsum(-1) > top_p
    drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses top_p
    drop[..., 0] = False
    mask = torch.zeros_like(drop).scatter_(-1, order, drop)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Dream's top-k filter: logits below the k-th largest -> min."""
    kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def dream_logits(logits: torch.Tensor, temperature: float, top_p: float | None, top_k: int | None) -> torch.Tensor:
    """Dream's sampling logits, float32: logits / T (if T > 0), then top_p, then top_k."""
    x = logits.float()
    if temperature > 0:
        x = x / temperature
    if top_p is not None and top_p < 1:
        x = top_p_filter(x, top_p)
    if top_k is not None:
        x = top_k_filter(x, top_k)
    return x


def dream_probs(logits: torch.Tensor, temperature: float, top_p: float | None, top_k: int | None) -> torch.Tensor:
    """Dream's sampling distribution: softmax of `dream_logits`."""
    return torch.softmax(dream_logits(logits, temperature, top_p, top_k), dim=-1)


def sample_from_probs(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One categorical draw per row of (..., V) probs from uniforms u: argmax p / Exp(1)."""
    return (probs / -torch.log(u)).argmax(-1)


def dream_confidence(probs: torch.Tensor, x0: torch.Tensor, alg: str) -> torch.Tensor:
    """Dream's position score: maskgit_plus p(x0), topk_margin p1 - p2, entropy sum p log p."""
    if alg == "maskgit_plus":
        return probs.gather(-1, x0[..., None])[..., 0]
    if alg == "topk_margin":
        top = probs.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]
    if alg == "entropy":
        return (probs * torch.log(probs + 1e-10)).sum(-1)
    raise ValueError(f"dream_confidence has no score for alg {alg!r}")


def gumbel_perturb(key: torch.Tensor, u: torch.Tensor, alg_temp: float) -> torch.Tensor:
    """Key whose top k are k draws without replacement from softmax(key / alg_temp) (Gumbel top-k).

    Same distribution as Dream's `multinomial(softmax(conf / alg_temp), k)`.
    """
    return key.double() / alg_temp - torch.log(-torch.log(u.double()))


# ---------------------------------------------------------------------------------------------
# A host's proposal at a set of positions


class Proposal(NamedTuple):
    """Per position: proposed token x0, its log-probability under the host's distribution (float32),
    the host's ranking score (None where the host ranks by uniforms) and the top-2 gap of the
    logits, all (n,)."""

    x0: torch.Tensor
    logp: torch.Tensor
    score: torch.Tensor | None
    gap: torch.Tensor


def log_prob_of(logits: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[x0] (...,) in float32, as logit minus logsumexp: probabilities near 1 that
    round to the same float32 stay distinct here (SPEC section 7), with no float64 copy of V."""
    # logsumexp = m + log1p(s), s the sum of exp(x - m) over every entry but the top one: a float32
    # logsumexp (m + log(1 + s)) rounds 1 + s to 1 once s < 6e-8, a probability of 1 - 1e-9 to 1
    x = logits.float()
    m, top = x.max(-1, keepdim=True)
    e = torch.exp(x - m).scatter_(-1, top, 0.0)  # (..., V)
    return (x.gather(-1, x0[..., None]) - m)[..., 0] - torch.log1p(e.sum(-1))


def propose(x: torch.Tensor, cfg: DecodeConfig, u: torch.Tensor | None, stops: tuple[int, ...] = ()) -> Proposal:
    """(n, V) float32 logits as the step uses them, (n, V) token uniforms (temperature > 0) -> Proposal.

    LLaDA: argmax or Gumbel-max x0, ranked by its log-probability; with `confidence_eos_eot_inf` it
    is taken with the `stops` (EOS/EoT) logits at -inf after x0 is chosen, as LLaDA's reference
    does: a position proposing a stop gets -inf (probability 0) and the others are renormalised.
    Dream and the block host (LLaDA2): the tempered, filtered distribution, argmax or a draw; Dream
    ranks by its alg's confidence (maskgit_plus by log-probability unless alg_temp samples
    positions from it), the block host by log-probability.
    """
    gap = top2_gap(x)
    if cfg.host == "llada":
        x0 = x.argmax(-1) if cfg.temperature == 0 else gumbel_argmax(x, u, cfg.temperature)
        if cfg.confidence_eos_eot_inf and stops:
            x = x.clone()
            x[:, list(stops)] = float("-inf")
        logp = log_prob_of(x, x0)
        return Proposal(x0, logp, logp, gap)
    z = dream_logits(x, cfg.temperature, cfg.top_p, cfg.top_k)
    if cfg.temperature == 0:
        x0 = z.argmax(-1)
    else:
        x0 = sample_from_probs(torch.softmax(z, dim=-1), u)
    logp = log_prob_of(z, x0)
    if cfg.host == "block" or cfg.alg == "maskgit_plus":
        score = logp if cfg.alg_temp <= 0 or cfg.host == "block" else logp.exp()  # alg_temp samples from p itself
    else:
        score = None if cfg.alg == "origin" else dream_confidence(torch.softmax(z, dim=-1), x0, cfg.alg)
    return Proposal(x0, logp, score, gap)


def random_positions(cfg: DecodeConfig) -> bool:
    """Whether the host ranks (or reveals) positions by uniforms rather than by confidence."""
    if cfg.host == "block":
        return False
    return cfg.remasking == "random" if cfg.host == "llada" else (cfg.alg == "origin" or cfg.alg_temp > 0)


# ---------------------------------------------------------------------------------------------
# Results


def count_generated(tokens: torch.Tensor, stop_ids: tuple[int, ...]) -> torch.Tensor:
    """(N, G) tokens -> (N,) number of tokens before the first stop id (G where none)."""
    stop = torch.zeros_like(tokens, dtype=torch.bool)
    for s in stop_ids:
        stop |= tokens == s
    return torch.where(stop.any(-1), stop.long().argmax(-1), tokens.shape[-1])
