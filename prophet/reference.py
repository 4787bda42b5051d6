"""The slow oracle: each prompt decoded alone, no padding, no slots, SPEC sections 1-2 step by step.

`prophet.decode.decode` must match it token for token. It uses the same per-position math
(`prophet.rules`, unit-tested on their own) and the same per-row random draws, but its own loop,
schedule arithmetic and selection (a Python sort), so that the batching machinery, the per-row
state and the commit rules are checked against a plain reading of SPEC. The cases SPEC leaves
open are decided in the hosts' module docstrings (`prophet.hosts.window` for LLaDA and Dream,
`prophet.hosts.block` for block diffusion); this file follows the same decisions. The block host's
oracle is LLaDA2's loop: one row, no cache, every pass recomputing the whole prefix.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Sequence

import torch

from prophet.config import DecodeConfig
from prophet.decode import (initial_window, kv_cache, make_result, monitored_slice, resolve_seeds, step_span,
                            stop_ids, validate_request)
from prophet.noise import POSITION_STREAM, TOKEN_STREAM, counter_key, position_uniforms, seed_words, token_uniforms
from prophet.hosts.block import resolve_block_config, row_layout, window_after_stop
from prophet.rules import cfg_mix, gumbel_perturb, pool_gaps, propose, random_positions, top2_gap, update_rule
from prophet.schedules import prophet_tau
from prophet.types import DLM, DecodeResult


@dataclass
class _Row:
    """One row's outcome."""

    tokens: torch.Tensor
    steps_used: int = 0
    forward_tokens: int = 0
    committed_early: bool = False
    commit_step: int = -1
    commit_gap: float = float("nan")
    nonfinite: bool = False
    seconds: float = 0.0


@torch.no_grad()
def decode_reference(model: DLM, prompts: Sequence[Sequence[int]], config: DecodeConfig,
                     generator: torch.Generator | None = None, seeds: Sequence[int] | None = None) -> DecodeResult:
    """Decode each prompt on its own (batch of one); same signature and result as `decode`."""
    if config.host == "block":
        config = resolve_block_config(model, config)
    prompts = validate_request(model, prompts, config)
    seeds = resolve_seeds(len(prompts), generator, seeds)
    device = torch.device(model.device)
    passes = 2 if config.cfg_scale > 0 else 1
    rows = []
    for p, seed in zip(prompts, seeds):
        if config.host == "block":  # LLaDA2's way: no cache, every prefix recomputed
            rows.append(_decode_block_row(model, p, config, seed, device))
            continue
        cache = None if config.cache == "none" else (passes, len(p) + config.gen_length)
        with kv_cache(model, config, cache):  # slot 0: the row; slot 1: its CFG pass
            rows.append(_decode_row(model, p, config, seed, device))
    tokens = (torch.stack([r.tokens for r in rows]) if rows
              else torch.zeros(0, config.gen_length, dtype=torch.long, device=device))
    return make_result(
        model, tokens,
        steps_used=torch.tensor([r.steps_used for r in rows], dtype=torch.long, device=device),
        committed_early=torch.tensor([r.committed_early for r in rows], dtype=torch.bool, device=device),
        commit_step=torch.tensor([r.commit_step for r in rows], dtype=torch.long, device=device),
        commit_gap=torch.tensor([r.commit_gap for r in rows], dtype=torch.float32, device=device),
        nonfinite=torch.tensor([r.nonfinite for r in rows], dtype=torch.bool, device=device),
        decode_seconds=torch.tensor([r.seconds for r in rows], dtype=torch.float64),
        forward_rows=passes * sum(r.steps_used for r in rows),
        forward_tokens=torch.tensor([r.forward_tokens for r in rows], dtype=torch.long, device=device))


def _decode_row(model: DLM, prompt: list[int], cfg: DecodeConfig, seed: int, device: torch.device) -> _Row:
    """The semi-autoregressive block loop with the commit rule, for one prompt.

    `view` holds the latest logits of every window position: each step overwrites the positions it
    scores (SPEC 6: under a dual cache the rest keep those of the block's refresh pass).
    """
    t0 = time.perf_counter()
    seed_w = seed_words([seed], device)  # (1, 2)
    prompt_t = torch.tensor(prompt, dtype=torch.long, device=device)
    window = initial_window(cfg, model.mask_id, device)
    row = _Row(window)
    view: torch.Tensor | None = None
    G, nb = cfg.gen_length, cfg.num_blocks
    S, BL = cfg.steps // nb, G // nb
    for b in range(nb):
        in_block = torch.zeros(G, dtype=torch.bool, device=device)
        in_block[b * BL:(b + 1) * BL] = True
        n0 = int((window[in_block] == model.mask_id).sum())  # LLaDA's schedule is fixed at block entry
        for s in range(S):
            masked = window == model.mask_id
            cand = masked & in_block
            if not cand.any():
                break  # block done before its budget: skip its leftover steps
            lo, width, refresh = step_span(cfg, b, s)
            scored = _scored_logits(model, prompt_t, window, cfg, lo, width, refresh)  # (width, V)
            row.steps_used += 1
            row.forward_tokens += (2 if cfg.cfg_scale > 0 else 1) * (
                len(prompt) + G if refresh else width + getattr(model, "query_lead", 0))
            if not all(torch.isfinite(x).all() for x in scored):
                row.nonfinite = True
                break
            scored = scored[0] if len(scored) == 1 else cfg_mix(scored[0], scored[1], cfg.cfg_scale)
            if cfg.logits_eos_inf:
                scored[:, model.eos_id] = float("-inf")
            if view is None:
                view = torch.zeros(G, scored.shape[-1], device=device)
            view[lo:lo + width] = scored
            logits = view
            if cfg.progress == "reference":  # generate_earlyexit: (step index + 1) / steps, 0.33 and 0.67
                p, cuts = (b * S + s + 1) / cfg.steps, (0.33, 0.67)
            else:
                p, cuts = (b * S + s) / cfg.steps, (1 / 3, 2 / 3)
            tau = cfg.thresholds[0] if p < cuts[0] else cfg.thresholds[1] if p < cuts[1] else cfg.thresholds[2]
            if cfg.rule == "prophet":
                g = _pooled_gap(logits, masked, cand, cfg)
                if g >= tau:  # go all in: every masked position of the window, later blocks too
                    window[masked] = logits.argmax(-1)[masked]
                    row.committed_early, row.commit_step, row.commit_gap = True, row.steps_used, g
                    break
            _update(window, logits, cand, cfg, partial(_draws, seed_w, row.steps_used), model, n0=n0, s=s, S=S,
                    tau=tau)
        if row.committed_early or row.nonfinite:
            break
    row.seconds = time.perf_counter() - t0
    return row


def _decode_block_row(model: DLM, prompt: list[int], cfg: DecodeConfig, seed: int, device: torch.device) -> _Row:
    """LLaDA2's block loop for one prompt, every pass recomputing the whole prefix (block-causal
    attention, no cache), with Prophet, look-ahead, editing and the EOS stop as `prophet.hosts.block`
    decides them. steps_used and forward_tokens are this loop's own: passes and prefix positions."""
    t0 = time.perf_counter()
    bl, P, G = int(cfg.block_length), len(prompt), cfg.gen_length
    first, last, total = row_layout(P, cfg)
    S = cfg.steps // cfg.num_blocks
    quota = [bl // S + (1 if s < bl % S else 0) for s in range(S)]  # LLaDA2's get_num_transfer_tokens
    x = torch.full((total,), model.mask_id, dtype=torch.long, device=device)
    x[:P] = torch.tensor(prompt, device=device)
    x[P:P + G] = initial_window(cfg, model.mask_id, device)
    row = _Row(x[P:P + G])
    seed_w, stops = seed_words([seed], device), stop_ids(model)
    decode_passes = 0
    b = first
    while b <= last:
        lo, hi = b * bl, (b + 1) * bl
        la = min(cfg.lookahead, last - b)
        span_hi = hi + la * bl
        s, post, phase, filled = 0, 0, "decode", False
        while True:
            logits = model.logits(x[:span_hi][None], None)[0, lo:span_hi].float()  # (span, V)
            row.steps_used += 1
            row.forward_tokens += span_hi
            decode_passes += 1
            if not torch.isfinite(logits).all():
                row.nonfinite = True
                break
            logits[:, model.mask_id] = float("-inf")  # never propose a mask
            masked = x[lo:span_hi] == model.mask_id
            if cfg.rule == "prophet" and phase == "decode":
                g = _block_pooled_gap(logits, masked, cfg, P, lo, span_hi)
                steps = (last - first + 1) * S
                tau = float(prophet_tau(torch.tensor([(b - first) * S + min(s, S - 1)]), steps, cfg.thresholds,
                                                cfg.progress)[0])
                if g >= tau:  # fill every masked position of the forwarded blocks; they are done
                    x[lo:span_hi][masked] = logits.argmax(-1)[masked]
                    if not row.committed_early:
                        row.committed_early, row.commit_step, row.commit_gap = True, row.steps_used, g
                    filled = True
                    break
            blk = logits[:bl]
            pos = torch.arange(lo, hi, device=device)
            u = None
            if cfg.temperature > 0:
                u = token_uniforms(_draws(seed_w, decode_passes, pos, TOKEN_STREAM), blk.shape[-1])
            prop = propose(blk, cfg, u, stops)
            x0, logp = prop.x0.tolist(), prop.logp.tolist()
            blk_masked = masked[:bl].tolist()
            cand = [j for j in range(bl) if blk_masked[j]]
            if cfg.sub_block is not None and cand:  # the first sub-block still holding a mask
                cand = [j for j in cand if j // cfg.sub_block == cand[0] // cfg.sub_block]
            chosen: set[int] = set()
            if phase == "decode":
                order = sorted(cand, key=lambda j: -logp[j])  # stable: ties by position
                chosen = set(order[:quota[min(s, S - 1)]])  # a sub-block may keep a block past S steps
                if update_rule(cfg) == "confidence_threshold":
                    chosen |= {j for j in cand if logp[j] > math.log(cfg.confidence)}
                s += 1
            edits = []
            if cfg.editing_threshold is not None:
                old = x[lo:hi].tolist()
                edits = [j for j in range(bl) if lo + j >= P and lo + j < total and not blk_masked[j]
                         and x0[j] != old[j] and logp[j] > math.log(cfg.editing_threshold)]
            for j in chosen | set(edits):
                x[lo + j] = x0[j]
            if phase == "post":
                post += 1
                if not edits or post >= cfg.max_post_steps:
                    break
            elif not (x[lo:hi] == model.mask_id).any():
                if cfg.editing_threshold is None or cfg.max_post_steps == 0:
                    break
                phase = "post"
        if row.nonfinite:
            break
        end = span_hi if filled else hi
        if any(t in stops for t in x[P:end].tolist()):
            break  # the reference's EOS stop
        b = end // bl
    window = x[P:P + G]
    row.tokens = window if row.nonfinite else window_after_stop(window[None], stops, model.eos_id)[0]
    row.seconds = time.perf_counter() - t0
    return row


def _block_pooled_gap(logits: torch.Tensor, masked: torch.Tensor, cfg: DecodeConfig, P: int, lo: int,
                      span_hi: int) -> float:
    """Prophet's G over the block host's region in the forwarded positions lo .. span_hi - 1."""
    bl = int(cfg.block_length)
    if cfg.region == "block":
        sel = masked.clone()
        sel[bl:] = False
    elif cfg.region == "window":
        sel = masked
    else:
        m = monitored_slice(cfg)
        a, z = P + m.start, P + m.start + cfg.answer_window
        if a < lo or z > span_hi:
            return float("nan")  # not every answer position is forwarded
        sel = torch.zeros_like(masked)
        sel[a - lo:z - lo] = True
    gaps = top2_gap(logits[sel])
    return float(pool_gaps(gaps[None], torch.ones_like(gaps[None], dtype=torch.bool), cfg.statistic, cfg.quantile))


def _scored_logits(model: DLM, prompt: torch.Tensor, window: torch.Tensor, cfg: DecodeConfig, lo: int,
                   width: int, refresh: bool) -> list[torch.Tensor]:
    """[(width, V)] float32 logits of window positions lo .. lo + width - 1, and with CFG a second
    pass with the prompt masked (in cache slot 1). Without cache the whole sequence is scored, then sliced."""
    ids = torch.cat([prompt, window])[None]  # (1, L)
    attn = torch.ones_like(ids, dtype=torch.bool)
    uncond = ids.clone()
    uncond[0, :prompt.numel()] = model.mask_id
    first = torch.tensor([prompt.numel() + lo], device=ids.device)

    def run(x: torch.Tensor, slot: int) -> torch.Tensor:
        if cfg.cache == "none":
            return model.logits(x, attn)[0, first.item():first.item() + width].float()
        slots = torch.tensor([slot], device=ids.device)
        return model.cached_logits(x, attn, slots, first, width, refresh)[0].float()

    return [run(ids, 0)] + ([run(uncond, 1)] if cfg.cfg_scale > 0 else [])


def _pooled_gap(logits: torch.Tensor, masked: torch.Tensor, cand: torch.Tensor, cfg: DecodeConfig) -> float:
    """Prophet's G over the monitored region (gaps taken only there)."""
    if cfg.region == "anchor":
        gaps = top2_gap(logits[monitored_slice(cfg)])
    elif cfg.region == "window":
        gaps = top2_gap(logits[masked])
    else:  # block: the masked positions of the current block
        gaps = top2_gap(logits[cand])
    return float(pool_gaps(gaps[None], torch.ones_like(gaps[None], dtype=torch.bool), cfg.statistic, cfg.quantile))


def _draws(seed_w: torch.Tensor, step: int, positions: torch.Tensor, stream: int) -> torch.Tensor:
    """(n,) counter keys of one row's draws at window positions, at its forward pass `step`."""
    return counter_key(seed_w, torch.tensor([step], device=positions.device), positions[None], stream)[0]


def _update(window: torch.Tensor, logits: torch.Tensor, cand: torch.Tensor, cfg: DecodeConfig,
            draws, model: DLM, *, n0: int, s: int, S: int, tau: float) -> None:
    """The host's normal step on one row: propose tokens for the candidates, commit the chosen ones.
    `draws(positions, stream)` gives this step's counter keys at window positions (prophet.noise)."""
    pos = cand.nonzero().flatten()  # candidate positions, ascending
    n = pos.numel()
    lc = logits[pos]  # (n, V)
    u = token_uniforms(draws(pos, TOKEN_STREAM), lc.shape[-1]) if cfg.temperature > 0 else None
    prop = propose(lc, cfg, u, stop_ids(model))
    x0, logp = prop.x0, prop.logp
    upos = position_uniforms(draws(pos, POSITION_STREAM)) if random_positions(cfg) else None
    reveal = [False] * n
    if cfg.host == "llada":
        score = prop.score if cfg.remasking == "low_confidence" else upos
        k = n0 // S + (1 if s < n0 % S else 0)
    else:
        ts = torch.linspace(1, cfg.eps, S + 1, device=window.device)  # per block (Fast-dLLM's Dream)
        last = s == S - 1
        if cfg.alg == "origin":
            score, k = -upos, 0
            reveal = (upos < (1 if last else 1 - ts[s + 1] / ts[s])).tolist()
        else:
            score = prop.score if cfg.alg_temp <= 0 else gumbel_perturb(prop.score, upos, cfg.alg_temp)
            k = n if last else int(n * (1 - ts[s + 1] / ts[s]))
    stops = stop_ids(model)
    demoted = [cfg.confidence_eos_eot_inf and t in stops for t in x0.tolist()]
    need = math.ceil(n / (S - s))  # what still empties the block within its budget
    rule = update_rule(cfg)  # the rule, or Prophet's parallel companion
    if rule == "gap_parallel":
        k = max(k, need)
        reveal = [r or (g >= tau and not d) for r, g, d in zip(reveal, top2_gap(lc).tolist(), demoted)]
    elif rule == "confidence_threshold":  # log p > log(confidence), as in float64 probabilities
        k = max(1, need)
        reveal = [lp > math.log(cfg.confidence) and not d for lp, d in zip(logp.tolist(), demoted)]
    scores = score.tolist()
    order = sorted(range(n), key=lambda j: (demoted[j], -scores[j]))  # stable: ties keep position order
    chosen = set(order[:k]) | {j for j in range(n) if reveal[j]}
    for j in chosen:
        window[pos[j]] = x0[j]
