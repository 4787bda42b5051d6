"""Hosts that score the whole generation window each step: LLaDA's blocks and Dream's eps schedule
(SPEC sections 1-3, 6). A host here is its step schedule (`WindowHost.schedule`); the machinery
around it (the plan, the slots, one step, the optional block KV cache) is shared.

`config.batch_size` slots share one forward pass per step. Prompts are left-padded to the widest
row in the pass, so every row's generation window is the last `gen_length` columns. Each row
carries its own step counter, block index and schedule; a row that finishes (early commit, no
mask left, or budget spent) leaves the pass and a waiting prompt takes its slot. With
`config.continuous=False` finished rows stay frozen in the pass until their whole batch is done
(the benchmark's baseline); results are identical either way.

Semantics shared with the oracle (`prophet.reference`), for the cases SPEC leaves open:
- Candidates of a step are the masked positions of the row's current block (LLaDA) or of the
  window (Dream, one block of `steps` steps). A block with no mask left is left at once, before
  its budget is spent: its leftover steps are skipped (saved) but count as consumed for progress.
- Progress p = schedule steps consumed / `steps` (blocks before the current one count in full).
- `commit_step` is the 1-based forward pass at which Prophet went all in (= steps_used).
- Gaps are taken on the logits the step uses: Dream-aligned, CFG-mixed and with the EOS ban
  applied; the all-in fill is their argmax (not a temperature sample).
- Region `anchor` monitors all `answer_window` positions after the anchor's free slot, masked or
  not (the paper's mode); regions `window` and `block` only still-masked positions. An empty
  region never commits.
- The anchor is written once: committed positions never change and the all-in fill writes
  masked positions only, so re-applying it after each step would be a no-op.
- `confidence_eos_eot_inf`: as LLaDA's reference at temperature 0, the confidence is the softmax
  taken with EOS/EoT at -inf after x0 is chosen (0 for a position proposing them, the others
  renormalised); such positions also rank after all others and never pass a parallel rule's
  threshold (at temperature > 0 the reference demotes only EoT, a known bug; here both).
- `gap_parallel` and `confidence_threshold` also commit ceil(masks left / steps left) per step,
  so a block always finishes within its budget. `confidence_threshold` replaces the host's
  schedule (Fast-dLLM); `gap_parallel` adds to it. Probabilities are the host's own: LLaDA's
  softmax of the logits, Dream's tempered/filtered sampling distribution.
- Dream `origin` reveals each candidate with probability 1 - t_s/t_i; where a rule needs more,
  the lowest uniforms (the next to be revealed) go first.
- Rows with NaN/inf logits stop at that step with `nonfinite` set and their window as it was.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prophet.config import DecodeConfig
from prophet.hosts.common import consecutive, initial_window, monitored_slice, slot_order, stop_ids
from prophet.noise import POSITION_STREAM, TOKEN_STREAM, counter_key, position_uniforms, seed_words, token_uniforms
from prophet.rules import (Proposal, budget_floor, cfg_mix, compact, parallel_commit, pool_gaps, prophet_decision,
                           propose, random_positions, rank_desc, select_positions, update_rule)
from prophet.schedules import prophet_tau
from prophet.types import DLM

# ---------------------------------------------------------------------------------------------
# The span one step of a row scores (shared with the oracle)


def span_lower(config: DecodeConfig, block: int) -> int:
    """First window position a step at `block` scores: the block start, or the anchor's monitored
    positions where they lie earlier (region 'anchor' watches them, decided or not)."""
    lo = block * (config.gen_length // config.num_blocks)
    if config.rule == "prophet" and config.region == "anchor":
        lo = min(lo, monitored_slice(config).start)
    return lo


def step_span(config: DecodeConfig, block: int, sstep: int) -> tuple[int, int, bool]:
    """(first window position, positions, refresh) that one step of a row scores (SPEC section 6).

    No cache: the whole sequence runs; the positions from the block start on are scored. A refresh
    (each block's first step, and every `cache_refresh_every` steps) runs the whole sequence too and
    stores its keys/values. Between refreshes, prefix runs the block start to the window's end;
    dual runs the block alone.
    """
    lo, G = span_lower(config, block), config.gen_length
    k = config.cache_refresh_every
    refresh = config.cache == "none" or sstep == 0 or (k is not None and sstep % k == 0)
    if config.cache == "dual" and not refresh:
        block_len = G // config.num_blocks
        return block * block_len, block_len, False
    return lo, G - lo, refresh


# ---------------------------------------------------------------------------------------------
# Fast path: plan, slots, one step


@dataclass(frozen=True)
class _Plan:
    """What all rows of a call share: ids, window layout, blocks and their mask counts at entry."""

    cfg: DecodeConfig
    host: "WindowHost"         # the step schedule
    mask_id: int
    pad_id: int
    stops: tuple[int, ...]
    S: int                     # steps per block
    nb: int                    # blocks (1 for Dream)
    init_window: torch.Tensor  # (G,) masks and anchor
    block_of: torch.Tensor     # (G,) block index of each window position
    block_n0: torch.Tensor     # (nb,) masked positions of each block at entry
    next_block: torch.Tensor   # (nb + 2,) first block >= b that has masks; nb where none
    first_cand: int            # candidates of a fresh row at its first step (host int, for noise shapes)
    init_masked: int           # masked window positions of a fresh row
    first_block: int           # block a fresh row starts in (host int)

    @staticmethod
    def build(cfg: DecodeConfig, model: DLM, device: torch.device, host: "WindowHost") -> "_Plan":
        """Plan for one decode call."""
        nb = cfg.num_blocks
        init = initial_window(cfg, model.mask_id, device)
        block_of = torch.arange(cfg.gen_length, device=device) // (cfg.gen_length // nb)
        n0 = torch.zeros(nb, dtype=torch.long, device=device).index_add_(0, block_of, (init == model.mask_id).long())
        counts = n0.tolist()
        has = [c > 0 for c in counts] + [True, True]  # sentinels at nb, nb + 1
        nxt = [min(nb, next(j for j in range(b, nb + 2) if has[j])) for b in range(nb + 2)]
        return _Plan(cfg, host, model.mask_id, model.pad_id, stop_ids(model), cfg.steps // nb, nb, init, block_of, n0,
                     torch.tensor(nxt, device=device), first_cand=counts[nxt[0]], init_masked=sum(counts),
                     first_block=nxt[0])

    def fresh_state(self, n: int) -> dict[str, torch.Tensor]:
        """Per-row device state of n newly admitted rows."""
        dev, G = self.init_window.device, self.init_window.numel()
        zeros = torch.zeros(n, dtype=torch.long, device=dev)
        return {"canvas": self.init_window.expand(n, -1).clone(),
                "block": self.next_block[zeros],   # first block with masks
                "sstep": zeros.clone(),            # schedule steps consumed in the current block
                "used": zeros.clone(),             # forward passes spent
                "live": torch.ones(n, dtype=torch.bool, device=dev),
                "early": torch.zeros(n, dtype=torch.bool, device=dev),
                "cstep": zeros - 1,
                "cgap": torch.full((n,), float("nan"), device=dev),
                "bad": torch.zeros(n, dtype=torch.bool, device=dev),
                "ftok": zeros.clone(),             # positions sent through the model
                "seed": torch.zeros(n, 2, dtype=torch.long, device=dev),  # the row's seed words (prophet.noise)
                # the latest top-2 gap and argmax of each window position (SPEC 6: under a dual
                # cache, positions outside the block keep those of the last refresh)
                "wgap": torch.full((n, G), float("nan"), device=dev),
                "warg": self.init_window.expand(n, -1).clone()}


@dataclass
class _Slot:
    """Host bookkeeping of one row in the pass."""

    row: int                    # index in the input
    seed: int                   # every random draw of the row derives from it (prophet.noise)
    prompt: torch.Tensor        # (P_i,) on the model's device
    n_cand: int                 # candidates at the next step (0 once finished)
    n_masked: int               # masked window positions at the next step
    t0: float                   # admission time
    block: int                  # block of the next step
    sstep: int = 0              # schedule steps consumed in that block
    done: bool = False          # finished (frozen in the pass when batching is static)


class _Batch:
    """The rows in the forward pass: slots on the host, left-padded prompts and state on the device."""

    def __init__(self, plan: _Plan, device: torch.device, model: DLM) -> None:
        self.plan, self.device, self.model = plan, device, model
        self.slots: list[_Slot] = []
        self.prompt_ids = torch.empty(0, 0, dtype=torch.long, device=device)  # (B, P)
        self.prompt_real = torch.empty(0, 0, dtype=torch.bool, device=device)  # (B, P), False on pads
        self.t = {k: v[:0] for k, v in plan.fresh_state(0).items()}

    def keep(self, idx: list[int]) -> None:
        """Keep the rows at idx, dropping prompt columns that became padding for every row. With a
        cache, row i keeps its keys/values in slot i (its CFG pass in batch_size + i): the rows
        that move fill the holes and carry their cache along."""
        idx, src, dst = slot_order(idx)
        if self.plan.cfg.cache != "none" and src:
            bs = self.plan.cfg.batch_size
            cfg_on = self.plan.cfg.cfg_scale > 0
            self.model.move_cache(src + [i + bs for i in src] * cfg_on, dst + [i + bs for i in dst] * cfg_on)
        ix = torch.tensor(idx, dtype=torch.long, device=self.device)
        self.slots = [self.slots[i] for i in idx]
        self.t = {k: v.index_select(0, ix) for k, v in self.t.items()}
        cut = self.prompt_ids.shape[1] - max((s.prompt.numel() for s in self.slots), default=0)
        self.prompt_ids = self.prompt_ids.index_select(0, ix)[:, cut:]
        self.prompt_real = self.prompt_real.index_select(0, ix)[:, cut:]

    def add(self, slots: list[_Slot]) -> None:
        """Append newly admitted rows, widening the left padding if a new prompt is longer."""
        width = max([self.prompt_ids.shape[1]] + [s.prompt.numel() for s in slots])
        grow = width - self.prompt_ids.shape[1]
        ids = torch.full((len(self.slots) + len(slots), width), self.plan.pad_id, device=self.device)
        real = torch.zeros(ids.shape, dtype=torch.bool, device=self.device)
        ids[:len(self.slots), grow:] = self.prompt_ids
        real[:len(self.slots), grow:] = self.prompt_real
        for i, s in enumerate(slots, start=len(self.slots)):
            ids[i, width - s.prompt.numel():] = s.prompt
            real[i, width - s.prompt.numel():] = True
        self.prompt_ids, self.prompt_real = ids, real
        fresh = self.plan.fresh_state(len(slots))
        fresh["seed"] = seed_words([s.seed for s in slots], self.device)
        self.t = {k: torch.cat([v, fresh[k]]) for k, v in self.t.items()}
        self.slots += slots

    @property
    def passes(self) -> int:
        """Forward rows per batch row: 2 with classifier-free guidance."""
        return 2 if self.plan.cfg.cfg_scale > 0 else 1

    def admit(self, rows: list[tuple[int, int, list[int]]], now: float) -> None:
        """Append waiting prompts (row index, seed, ids) as fresh rows."""
        p = self.plan
        self.add([_Slot(r, seed, torch.tensor(ids, dtype=torch.long, device=self.device), p.first_cand,
                        p.init_masked, now, p.first_block) for r, seed, ids in rows])

    def step(self, model: DLM) -> list[bool]:
        """One forward pass and update of every live row -> per row, whether it finished now."""
        info = _step(model, self)
        for s, (_, n_cand, n_masked, block, sstep) in zip(self.slots, info):
            s.n_cand, s.n_masked, s.block, s.sstep = n_cand, n_masked, block, sstep
        return [bool(row[0]) for row in info]


# Working memory: the rules read the vocabulary a chunk of positions at a time, in float32, so the
# step's peak stays near the model's own logits (BENCHMARKS.md, memory). Up to BYTES_PER_ENTRY
# bytes of temporaries per (position, token) (a float32 copy, uniforms, a sort for top-p), within
# half the logits' own size, and never fewer positions than MIN_CHUNK_ENTRIES allows.
BYTES_PER_ENTRY, MIN_CHUNK_ENTRIES = 48, 1 << 20


@dataclass
class _Span:
    """Which window positions a step scores, per row: logits column c is window position off + c;
    the row's own scored positions are lo .. lo + width - 1.

    `logits` are the model's, in its dtype: (B, W, V), or (2B, W, V) with CFG (conditional rows
    first). `rows` gives float32 logits as the step uses them (CFG-mixed, EOS banned) for a few
    positions at a time; nothing makes a float32 copy of the whole span.
    """

    logits: torch.Tensor  # (B or 2B, W, V)
    off: torch.Tensor     # (B,)
    lo: torch.Tensor      # (B,)
    width: torch.Tensor   # (B,)
    cfg_scale: float = 0.0
    ban: int | None = None  # token whose logit is -inf (logits_eos_inf)

    def rows(self, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(n,) rows and columns -> (n, V) float32 logits as the step uses them."""
        x = self.logits[b, c].float()
        if self.cfg_scale > 0:
            x = cfg_mix(x, self.logits[b + self.off.numel(), c].float(), self.cfg_scale)
        if self.ban is not None:
            x[:, self.ban] = float("-inf")
        return x

    def chunk(self) -> int:
        """Positions per chunk of `rows`."""
        V = self.logits.shape[-1]
        budget = self.logits.numel() * self.logits.element_size() // 2
        return max(1, MIN_CHUNK_ENTRIES // V, budget // (BYTES_PER_ENTRY * V))

    def scored(self) -> torch.Tensor:
        """(B, W) bool: column c holds one of the row's scored positions."""
        pos = self.off[:, None] + torch.arange(self.logits.shape[1], device=self.off.device)
        return (pos >= self.lo[:, None]) & (pos < (self.lo + self.width)[:, None])

    def columns(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, K) window positions -> (B, K) logits columns (clamped, for padded slots)."""
        return (positions - self.off[:, None]).clamp(0, self.logits.shape[1] - 1)


def _span_logits(model: DLM, batch: _Batch, spans: list[tuple[int, int, bool]]) -> _Span:
    """The step's forward pass(es) -> span logits, float32. Both CFG passes run stacked.

    No cache: one pass over every row's whole sequence, the LM head on the last W positions. With a
    cache: rows that refresh and rows that read the cache run as two passes (their widths differ),
    each row in its own cache slot.
    """
    cfg, canvas = batch.plan.cfg, batch.t["canvas"]
    B, G = canvas.shape
    P = batch.prompt_ids.shape[1]
    dev = canvas.device
    attn = torch.cat([batch.prompt_real, torch.ones_like(canvas, dtype=torch.bool)], 1)  # (B, P + G)
    ids = torch.cat([batch.prompt_ids, canvas], 1)
    cfg_on = cfg.cfg_scale > 0
    if cfg_on:  # unconditional pass: the row's real prompt positions masked, pads left as pads
        uncond = torch.cat([torch.where(batch.prompt_real, batch.plan.mask_id, batch.prompt_ids), canvas], 1)
        ids, attn = torch.cat([ids, uncond]), torch.cat([attn, attn])
    W = max(w + lo for lo, w, _ in spans) - min(lo for lo, _, _ in spans) if cfg.cache == "none" else \
        max(w for _, w, _ in spans)
    lo = torch.tensor([sp[0] for sp in spans], device=dev)
    width = torch.tensor([sp[1] for sp in spans], device=dev)
    if cfg.cache == "none":
        no_pad = all(sl.prompt.numel() == P for sl in batch.slots)  # known on the host: no sync
        out = model.logits(ids, None if no_pad else attn, last=W)  # (B or 2B, W, V)
        off = torch.full((B,), G - W, device=dev)
    else:
        out = None
        for refresh in (True, False):
            rows = [i for i, sp in enumerate(spans) if sp[2] == refresh]
            if not rows:
                continue
            rows_all = rows + [i + B for i in rows] if cfg_on else rows
            ix = torch.tensor(rows_all, device=dev)
            w = max(spans[i][1] for i in rows)
            # row i keeps its keys/values in slot i, its CFG pass in batch_size + i: each pass runs on
            # consecutive slots where it can, so attention reads the cache in place, no gather
            halves = []
            for half, slot0 in enumerate((0, cfg.batch_size)[:1 + cfg_on]):
                kv = [i + slot0 for i in rows]
                hx = torch.tensor([i + half * B for i in rows], device=dev)
                halves.append(model.cached_logits(ids[hx], attn[hx], torch.tensor(kv, device=dev), P + lo[rows], w,
                                                  refresh, consecutive(kv)))  # (rows, w, V)
            part = torch.cat(halves) if cfg_on else halves[0]
            if len(rows) == B and w == W:
                out = part
                break
            if out is None:
                out = part.new_zeros(ids.shape[0], W, part.shape[-1])
            out[ix, :w] = part
        off = lo
    return _Span(out, off, lo, width, cfg.cfg_scale, model.eos_id if cfg.logits_eos_inf else None)


def _summarise(t: dict[str, torch.Tensor], span: _Span) -> None:
    """Store the top-2 gap and argmax of every scored position in the row's window view."""
    B, W = t["wgap"].shape[0], span.logits.shape[1]
    G = t["wgap"].shape[1]
    flat = torch.arange(B * W, device=span.off.device)
    gaps, args = torch.empty(B * W, device=flat.device), torch.empty(B * W, dtype=torch.long, device=flat.device)
    for c0 in range(0, B * W, span.chunk()):
        f = flat[c0:c0 + span.chunk()]
        x = span.rows(f // W, f % W)
        top = x.topk(2, dim=-1).values
        gaps[f], args[f] = top[:, 0] - top[:, 1], x.argmax(-1)
    pos = span.off[:, None] + torch.arange(W, device=flat.device)
    pos = torch.where(span.scored(), pos, G)  # unscored columns land in a scratch column
    gap = torch.cat([t["wgap"], t["wgap"][:, :1]], 1).scatter_(1, pos, gaps.view(B, W))
    arg = torch.cat([t["warg"], t["warg"][:, :1]], 1).scatter_(1, pos, args.view(B, W))
    t["wgap"], t["warg"] = gap[:, :G], arg[:, :G]


def _prophet_gaps(batch: _Batch, idx: torch.Tensor, valid: torch.Tensor,
                  masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaps (B, K) and region mask (B, K) of the monitored region, from the window view."""
    plan, wgap = batch.plan, batch.t["wgap"]
    region = plan.cfg.region
    if region == "anchor":
        gaps = wgap[:, monitored_slice(plan.cfg)]
        return gaps, torch.ones_like(gaps, dtype=torch.bool)
    if region == "block":  # the block's masked positions are this step's candidates
        return wgap.gather(1, idx), valid
    midx, mvalid = compact(masked, max(1, max(s.n_masked for s in batch.slots)))
    return wgap.gather(1, midx), mvalid


def _proposals(span: _Span, t: dict[str, torch.Tensor], idx: torch.Tensor, cfg: DecodeConfig,
               stops: tuple[int, ...]) -> Proposal:
    """The host's proposal at every candidate (B, C), a chunk of positions at a time; token draws
    from the row's seed, its forward pass and the window position (prophet.noise)."""
    B, C = idx.shape
    col = span.columns(idx)
    b = torch.arange(B, device=idx.device)[:, None].expand(B, C).reshape(-1)
    col = col.reshape(-1)
    keys = counter_key(t["seed"], t["used"], idx, TOKEN_STREAM).reshape(-1) if cfg.temperature > 0 else None
    parts = []
    for c0 in range(0, B * C, span.chunk()):
        sl = slice(c0, c0 + span.chunk())
        x = span.rows(b[sl], col[sl])
        parts.append(propose(x, cfg, None if keys is None else token_uniforms(keys[sl], x.shape[-1]), stops))
    return Proposal(*(None if f[0] is None else torch.cat(f).view(B, C) for f in zip(*parts)))


def _propose(plan: _Plan, t: dict[str, torch.Tensor], prop: Proposal, valid: torch.Tensor,
             position_u: torch.Tensor | None, tau: torch.Tensor) -> torch.Tensor:
    """The host's schedule and the commit rule on the candidates' proposals -> selection (B, C)."""
    cfg = plan.cfg
    n = valid.sum(-1)  # (B,) candidates left
    sstep = t["sstep"].clamp(max=plan.S - 1)  # finished (frozen) rows may sit past the budget
    key, k, reveal = plan.host.schedule(plan, t, prop, n, sstep, position_u)
    demoted = torch.zeros_like(valid)
    if cfg.confidence_eos_eot_inf:
        demoted = torch.isin(prop.x0, torch.tensor(plan.stops, device=valid.device))
    k, reveal = parallel_commit(update_rule(cfg), cfg, k, budget_floor(n, plan.S - sstep), prop, tau, demoted,
                                reveal)
    tier = torch.where(valid, 2 - demoted.long(), 0)
    return select_positions(rank_desc(key, tier), valid, k, reveal)


def _step(model: DLM, batch: _Batch) -> list[list[int]]:
    """One forward pass and one update of every live row; returns per row
    [finished, n_cand, n_masked, block, sstep] for the next step.

    The returned list is the step's single host synchronisation.
    """
    plan, t = batch.plan, batch.t
    cfg = plan.cfg
    spans = [step_span(cfg, min(s.block, plan.nb - 1), s.sstep) for s in batch.slots]
    span = _span_logits(model, batch, spans)
    raw = span.logits  # (B or 2B, W, V), the model's dtype
    B = t["live"].shape[0]
    finite = torch.isfinite(raw.amax(-1)) & torch.isfinite(raw.amin(-1))  # (B or 2B, W), no (B, W, V) temporary
    finite = finite.view(-1, B, finite.shape[1]).all(0)
    bad = t["live"] & ~(finite | ~span.scored()).all(1)
    raw.masked_fill_(bad.repeat(raw.shape[0] // B)[:, None, None], 0.0)
    t["used"] += t["live"].long()
    t["ftok"] += t["live"].long() * _forward_tokens(model, batch, spans)
    live = t["live"] & ~bad
    masked = t["canvas"] == plan.mask_id  # (B, G)
    in_block = plan.block_of[None, :] == t["block"][:, None]
    idx, valid = compact(masked & in_block & live[:, None], max(1, max(s.n_cand for s in batch.slots)))
    tau = prophet_tau(t["block"] * plan.S + t["sstep"], cfg.steps, cfg.thresholds, cfg.progress)
    commit = torch.zeros_like(live)
    if cfg.rule == "prophet":
        _summarise(t, span)
        gaps, region = _prophet_gaps(batch, idx, valid, masked & live[:, None])
        pooled = pool_gaps(gaps, region, cfg.statistic, cfg.quantile)
        commit = live & prophet_decision(pooled, tau)
        t["canvas"] = torch.where(commit[:, None] & masked, t["warg"], t["canvas"])
        t["early"] |= commit
        t["cstep"] = torch.where(commit, t["used"], t["cstep"])
        t["cgap"] = torch.where(commit, pooled, t["cgap"])
        valid = valid & ~commit[:, None]
    prop = _proposals(span, t, idx, cfg, plan.stops)
    position_u = (position_uniforms(counter_key(t["seed"], t["used"], idx, POSITION_STREAM))
                  if random_positions(cfg) else None)
    sel = _propose(plan, t, prop, valid, position_u, tau)
    t["canvas"].scatter_(1, idx, torch.where(sel, prop.x0, t["canvas"].gather(1, idx)))
    return _advance(batch, live, bad, commit)


def _forward_tokens(model: DLM, batch: _Batch, spans: list[tuple[int, int, bool]]) -> torch.Tensor:
    """(B,) positions each row sends through the model this step: its whole sequence on a refresh (or
    without cache), else its scored positions plus the model's lead; both CFG passes counted."""
    G, lead = batch.plan.cfg.gen_length, getattr(model, "query_lead", 0)
    passes = 2 if batch.plan.cfg.cfg_scale > 0 else 1
    n = [passes * (s.prompt.numel() + G if refresh else width + lead)
         for s, (_, width, refresh) in zip(batch.slots, spans)]
    return torch.tensor(n, device=batch.device)


def _advance(batch: _Batch, live: torch.Tensor, bad: torch.Tensor, commit: torch.Tensor) -> list[list[int]]:
    """Move live rows along their schedule (next block when the block is empty or spent); flag finished rows."""
    plan, t = batch.plan, batch.t
    t["bad"] |= bad
    t["sstep"] += live.long()
    masked = t["canvas"] == plan.mask_id
    block_left = (masked & (plan.block_of[None, :] == t["block"][:, None])).sum(1)
    move = live & ((block_left == 0) | (t["sstep"] >= plan.S))
    t["block"] = torch.where(move, plan.next_block[t["block"] + 1], t["block"])
    t["sstep"] = torch.where(move, 0, t["sstep"])
    n_masked = masked.sum(1)
    finished = t["live"] & (bad | commit | (n_masked == 0) | (t["block"] >= plan.nb))
    t["live"] &= ~finished
    n_cand = (masked & (plan.block_of[None, :] == t["block"][:, None]) & t["live"][:, None]).sum(1)
    return torch.stack([finished.long(), n_cand, n_masked, t["block"], t["sstep"]], 1).tolist()




# ---------------------------------------------------------------------------------------------
# The host object


class WindowHost:
    """A host that scores the window each step; subclasses give the step schedule."""

    name = ""

    def prepare(self, model: DLM, config: DecodeConfig) -> DecodeConfig:
        """The config as this host runs it (nothing model-dependent to resolve here)."""
        return config

    def cache_rows(self, config: DecodeConfig, prompts: list[list[int]]) -> tuple[int, int] | None:
        """(slots, positions) of keys/values the model keeps, or None without a cache."""
        if config.cache == "none":
            return None
        passes = 2 if config.cfg_scale > 0 else 1
        return passes * config.batch_size, max(len(p) for p in prompts) + config.gen_length

    def batch(self, model: DLM, config: DecodeConfig, device: torch.device) -> _Batch:
        """An empty forward pass for one decode call."""
        return _Batch(_Plan.build(config, model, device, self), device, model)

    def schedule(self, plan: _Plan, t: dict[str, torch.Tensor], prop: Proposal, n: torch.Tensor,
                 sstep: torch.Tensor, position_u: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Ranking key (B, C), positions to commit k (B,) and forced reveals (B, C) or None, for rows
        with n candidates at schedule step sstep of their block."""
        raise NotImplementedError
