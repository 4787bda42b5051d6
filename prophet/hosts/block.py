"""The block host: block-diffusion models (LLaDA2.x; SPEC section 8) on their exact KV cache.

A row's sequence is its prompt, the window and, as in LLaDA2's reference, masks up to the next
multiple of `block_length` (the tail; decoded, then dropped). Blocks are counted from the row's own
position 0. The prompt's whole blocks are prefilled once at admission (one pass, keys/values only).
Each step forwards the row's current block (its prompt part too) and `lookahead` mask blocks after
it, against the cached prefix; rows at different blocks and prompt lengths share the pass, row i
in cache slot i, so attention reads the cache in place (`prophet.hosts.common.slot_order`).

Decisions, shared with the oracle (`prophet.reference`, which recomputes every prefix instead):
- Steps per block S = steps / (gen_length / block_length); the block's quota per step is LLaDA2's
  (block_length spread over S steps, the first ones one more), capped by the masks left, so a
  block always empties within S steps. `full` commits the quota's most confident;
  `confidence_threshold` also every masked position whose probability exceeds `confidence`
  (LLaDA2's: all above the threshold, else the quota's most confident). `sub_block` (Fast-dLLM
  v2's decoder) limits the candidates to the block's first sub-block that still holds a mask; the
  block then runs until empty, its later steps at the last quota. Temperature 0 is argmax
  (LLaDA2's remote code samples even at 0, a known bug); > 0 samples the tempered, filtered
  distribution from counter-based uniforms of (row seed, decode pass, position). The mask token's
  logit is -inf in every use (a committed mask would leave its block unfinishable).
- `prophet`: before the step's update, the top-2 gaps of its region (`block`: the current block's
  masked positions; `window`: the masked positions of every forwarded block; `anchor`: the
  answer positions after the anchor, only once every one of them is forwarded) pooled against
  tau(p), p = schedule steps the row consumed / (its blocks x S). When it clears, every masked
  position of the forwarded blocks gets its argmax and those blocks are done (the row goes on
  with the next block); else the normal update runs (`parallel`: the schedule, or the threshold
  rule on top). committed_early, commit_step and commit_gap tell the first fill.
- A finished block gets one pass that stores its final keys/values, unless it is the row's last
  (or its EOS block), or its last pass already ran on the final tokens (an editing post step that
  changed nothing). Every pass counts in steps_used (the prefill too), its positions in
  forward_tokens.
- EOS: after a block is done, a row whose generated positions so far hold EOS/EoT stops (the
  reference's eos check); at every row's end the window after its first EOS/EoT is EOS.
- Editing (LLaDA2.1, `editing_threshold`): each pass of the current block also rewrites its
  committed non-prompt positions whose prediction differs from their token and whose probability
  exceeds the threshold. "Committed" = not a mask when the pass began. After the last mask is
  gone, post passes run until one edits nothing or `max_post_steps` have run. Prophet's fill
  ends its blocks without post passes: its positions are final (editing them would spend the
  passes the fill saved).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from prophet.config import ConfigError, DecodeConfig
from prophet.hosts.common import initial_window, monitored_slice, slot_order, stop_ids
from prophet.noise import TOKEN_STREAM, counter_key, seed_words, token_uniforms
from prophet.rules import (Proposal, above_confidence, pool_gaps, prophet_decision, propose, rank_desc,
                           select_positions, top2_gap, update_rule)
from prophet.schedules import llada_schedule, prophet_tau
from prophet.types import DLM, BlockDLM

DECODE, POST, STORE = 0, 1, 2  # a row's phase: decoding its block, editing post passes, storing keys/values
CHUNK_ENTRIES = 1 << 22        # float32 (position, token) entries the rules read at a time


def resolve_block_config(model: DLM, config: DecodeConfig) -> DecodeConfig:
    """The config with the model's attention block; a model without one, or another block, is refused."""
    bl = getattr(model, "block_length", None)
    if bl is None or not isinstance(model, BlockDLM):
        raise ConfigError(f"host 'block' needs a block-diffusion model (block-causal attention); this model "
                          f"({getattr(model, 'family', type(model).__name__)}) is bidirectional: use host "
                          "'llada' or 'dream', or leave decoding.host unset")
    if config.block_length not in (None, bl):
        raise ConfigError(f"decoding.block_length={config.block_length}: host 'block' decodes in the model's "
                          f"attention blocks ({bl}); leave block_length unset (or load the model with "
                          "block_length= if it was trained with another)")
    return replace(config, block_length=bl) if config.block_length is None else config


def row_layout(prompt_len: int, config: DecodeConfig) -> tuple[int, int, int]:
    """(first block, last block, total positions) of a row: the prompt's last partial block is the
    first one decoded; the total is rounded up to whole blocks (LLaDA2's reference)."""
    bl = int(config.block_length)  # type: ignore[arg-type]
    blocks = -(-(prompt_len + config.gen_length) // bl)
    return prompt_len // bl, blocks - 1, blocks * bl


def window_after_stop(tokens: torch.Tensor, stops: tuple[int, ...], eos: int) -> torch.Tensor:
    """(B, G) windows -> the same with every position after the first EOS/EoT set to EOS."""
    stop = torch.isin(tokens, torch.tensor(stops, device=tokens.device))
    after = (stop.long().cumsum(1) - stop.long()) > 0
    return torch.where(after, eos, tokens)


def step_logits(x: torch.Tensor, mask_id: int) -> torch.Tensor:
    """(n, V) logits as a step uses them: float32, the mask token banned (a committed mask would
    leave its block unfinishable)."""
    x = x.float()
    x[:, mask_id] = float("-inf")
    return x


def chunked(x: torch.Tensor, mask_id: int, fn, *extra: torch.Tensor):
    """fn over `step_logits` rows (n, V) of x (..., V), a chunk at a time -> outputs shaped as x's leading dims."""
    lead, V = x.shape[:-1], x.shape[-1]
    flat = x.reshape(-1, V)
    ex = [e.reshape(flat.shape[0], *e.shape[len(lead):]) for e in extra]
    step = max(1, CHUNK_ENTRIES // V)
    parts = [fn(step_logits(flat[i:i + step], mask_id), *(e[i:i + step] for e in ex))
             for i in range(0, flat.shape[0], step)]
    if isinstance(parts[0], tuple):
        return tuple(None if p[0] is None else torch.cat(p).view(*lead) for p in zip(*parts))
    return torch.cat(parts).view(*lead) if parts else x.new_zeros(lead)


def gaps_and_argmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, V) logits -> top-2 gap and argmax (n,)."""
    return top2_gap(x), x.argmax(-1)


def block_proposals(logits: torch.Tensor, cfg: DecodeConfig, keys: torch.Tensor | None, stops: tuple[int, ...],
                    mask_id: int) -> Proposal:
    """(B, C, V) logits of a block, (B, C) token keys (temperature > 0) -> Proposal fields (B, C)."""
    if keys is None:
        return Proposal(*chunked(logits, mask_id, lambda x: propose(x, cfg, None, stops)))
    return Proposal(*chunked(logits, mask_id, lambda x, k: propose(x, cfg, token_uniforms(k, x.shape[-1]), stops),
                             keys))


@dataclass
class _Slot:
    """Host bookkeeping of one row in the pass."""

    row: int           # index in the input
    t0: float          # admission time
    phase: int = DECODE
    done: bool = False


class BlockBatch:
    """The rows in the pass: each row's whole sequence left-aligned in `t['seq']`, its state beside it."""

    passes = 1

    def __init__(self, model: BlockDLM, cfg: DecodeConfig, device: torch.device) -> None:
        self.model, self.cfg, self.device = model, cfg, device
        self.bl = int(cfg.block_length)  # type: ignore[arg-type]
        self.S = cfg.steps // cfg.num_blocks
        self.quota = llada_schedule(torch.tensor([self.bl], device=device), self.S)[0]  # (S,)
        self.W = self.bl * (1 + cfg.lookahead)  # query columns of a pass
        self.stops = stop_ids(model)
        self.init_window = initial_window(cfg, model.mask_id, device)
        self.slots: list[_Slot] = []
        self.t: dict[str, torch.Tensor] = {}

    # -- admission, compaction ----------------------------------------------------------------

    def admit(self, rows: list[tuple[int, int, list[int]]], now: float) -> None:
        """Append waiting prompts (row index, seed, ids) and prefill their whole prompt blocks."""
        cfg, dev, mask = self.cfg, self.device, self.model.mask_id
        layouts = [row_layout(len(ids), cfg) for _, _, ids in rows]
        width = max([lay[2] for lay in layouts] + [self.t["seq"].shape[1] if self.t else 0])
        seq = torch.full((len(rows), width), self.model.pad_id, dtype=torch.long, device=dev)
        for i, ((_, _, ids), (_, _, total)) in enumerate(zip(rows, layouts)):
            P = len(ids)
            seq[i, :P] = torch.tensor(ids, dtype=torch.long, device=dev)
            seq[i, P:total] = mask
            seq[i, P:P + cfg.gen_length] = self.init_window
        col = lambda vals, dtype=torch.long: torch.tensor(vals, dtype=dtype, device=dev)  # noqa: E731
        n = len(rows)
        zeros = torch.zeros(n, dtype=torch.long, device=dev)
        fresh = {"seq": seq, "plen": col([len(ids) for _, _, ids in rows]),
                 "first": col([lay[0] for lay in layouts]), "blk": col([lay[0] for lay in layouts]),
                 "last": col([lay[1] for lay in layouts]), "total": col([lay[2] for lay in layouts]),
                 "sstep": zeros.clone(), "post": zeros.clone(), "phase": zeros.clone(), "store_hi": zeros.clone(),
                 "used": zeros.clone(), "ftok": zeros.clone(), "dstep": zeros.clone(), "cstep": zeros - 1,
                 "live": torch.ones(n, dtype=torch.bool, device=dev),
                 "early": torch.zeros(n, dtype=torch.bool, device=dev),
                 "bad": torch.zeros(n, dtype=torch.bool, device=dev),
                 "cgap": torch.full((n,), float("nan"), device=dev),
                 "seed": seed_words([seed for _, seed, _ in rows], dev),
                 "canvas": self.init_window.expand(n, -1).clone()}
        if self.t:
            old = self.t["seq"]
            if old.shape[1] < width:
                self.t["seq"] = torch.cat([old, old.new_full((old.shape[0], width - old.shape[1]),
                                                             self.model.pad_id)], 1)
            self.t = {k: torch.cat([v, fresh[k]]) for k, v in self.t.items()}
        else:
            self.t = fresh
        first_slot = len(self.slots)
        self.slots += [_Slot(r, now) for r, _, _ in rows]
        self._prefill(first_slot, [lay[0] * self.bl for lay in layouts])

    def _prefill(self, first_slot: int, whole: list[int]) -> None:
        """One keys/values-only pass over the new rows' whole prompt blocks (rows without one: padding)."""
        if max(whole) == 0:
            return
        n, dev = len(whole), self.device
        end = torch.tensor(whole, device=dev)
        cols = torch.arange(max(whole), device=dev)
        pos = torch.where(cols[None] < end[:, None], cols[None], -1)  # (n, Q)
        seq = self.t["seq"][first_slot:]
        ids = torch.where(pos >= 0, seq.gather(1, pos.clamp(min=0)), self.model.pad_id)
        self.model.block_logits(ids, pos, torch.arange(first_slot, first_slot + n, device=dev), end, first_slot,
                                scored=False)
        ran = (end > 0).long()
        self.t["used"][first_slot:] += ran
        self.t["ftok"][first_slot:] += end

    def keep(self, idx: list[int]) -> None:
        """Keep the rows at idx; row i stays in cache slot i (the rows that move carry their cache)."""
        order, src, dst = slot_order(idx)
        self.model.move_cache(src, dst)
        ix = torch.tensor(order, dtype=torch.long, device=self.device)
        self.slots = [self.slots[i] for i in order]
        self.t = {k: v.index_select(0, ix) for k, v in self.t.items()}
        if self.slots:
            self.t["seq"] = self.t["seq"][:, :int(self.t["total"].max())]  # host read only when rows leave
        else:
            self.t = {}

    # -- one step -----------------------------------------------------------------------------

    def step(self, model: BlockDLM) -> list[bool]:
        """One pass of every live row (decode, post or store) and its update -> per row, finished now."""
        t, cfg, bl, W = self.t, self.cfg, self.bl, self.W
        B, dev = len(self.slots), self.device
        live, phase = t["live"], t["phase"]
        seq = t["seq"]
        L = seq.shape[1]
        la = torch.clamp(t["last"] - t["blk"], max=cfg.lookahead)
        nblocks = torch.where(phase == DECODE, 1 + la, torch.where(phase == POST, 1, t["store_hi"] - t["blk"]))
        width = nblocks * bl * live.long()  # (B,) positions each row forwards
        start = t["blk"] * bl
        # a shifted family (Fast-dLLM v2) also runs the position before the block: its output scores the
        # block's first position (block-causal, it sees only cached blocks, so its keys/values are rewritten
        # unchanged); the adapter drops the extra column, so the logits stay (B, W, V)
        cols = torch.arange(W, device=dev)
        real = cols[None] < width[:, None]  # (B, W)
        lead = getattr(model, "query_lead", 0) * (width > 0).long()  # (B,)
        pos = torch.where(real, start[:, None] + cols[None], -1)  # (B, W) the scored positions
        qcols = torch.arange(W + int(getattr(model, "query_lead", 0)), device=dev)
        qpos = start[:, None] - lead[:, None] + qcols[None]
        qreal = (qcols[None] < (width + lead)[:, None]) & (qpos >= 0)  # (B, W + lead) the forwarded ones
        qpos = torch.where(qreal, qpos, -1)
        ids = torch.where(qreal, seq.gather(1, qpos.clamp(0, L - 1)), model.pad_id)
        scored = any(s.phase != STORE and not s.done for s in self.slots)
        logits = model.block_logits(ids, qpos, torch.arange(B, device=dev), start + width, 0, scored)  # (B, W, V)
        t["used"] += live.long()
        t["ftok"] += width + lead
        scoring = live & (phase != STORE)
        if not scored:
            return self._advance(scoring, torch.zeros_like(live), torch.zeros_like(live), torch.zeros_like(live))
        t["dstep"] += scoring.long()
        finite = torch.isfinite(logits.amax(-1)) & torch.isfinite(logits.amin(-1))  # (B, W)
        bad = scoring & ~(finite | ~real).all(1)
        ok = scoring & ~bad
        fire = self._prophet(logits, pos, real, ok & (phase == DECODE)) if cfg.rule == "prophet" else \
            torch.zeros_like(live)
        seq = t["seq"]  # with Prophet's fills
        cur = start[:, None] + cols[None, :bl]  # (B, bl) positions of the current block
        in_row = (cur < t["total"][:, None]) & ok[:, None]
        cur_tok = seq.gather(1, cur.clamp(max=L - 1))
        masked = (cur_tok == model.mask_id) & in_row
        keys = counter_key(t["seed"], t["dstep"], cur, TOKEN_STREAM) if cfg.temperature > 0 else None
        prop = block_proposals(logits[:, :bl], cfg, keys, self.stops, model.mask_id)
        decoding = ok & (phase == DECODE) & ~fire
        valid = masked & decoding[:, None]
        if cfg.sub_block is not None:  # only the first sub-block that still holds a mask (Fast-dLLM v2)
            sub = cols[:bl] // cfg.sub_block                                              # (bl,)
            first_sub = torch.where(masked, sub[None], bl).amin(1, keepdim=True)          # (B, 1)
            valid &= sub[None] == first_sub
        k = self.quota[t["sstep"].clamp(max=self.S - 1)]
        reveal = above_confidence(prop.logp, cfg.confidence) if update_rule(cfg) == "confidence_threshold" else None
        sel = select_positions(rank_desc(prop.logp, valid.long()), valid, k, reveal)
        edit = torch.zeros_like(sel)
        if cfg.editing_threshold is not None:
            committed = in_row & ~masked & (cur >= t["plen"][:, None]) & ~fire[:, None]
            edit = committed & (prop.x0 != cur_tok) & above_confidence(prop.logp, cfg.editing_threshold)
        new = torch.where(sel | edit, prop.x0, cur_tok)
        t["seq"] = seq.scatter(1, cur.clamp(max=L - 1), torch.where(in_row, new, cur_tok))
        t["sstep"] += decoding.long()
        return self._advance(scoring, bad, fire, edit.any(1))

    def _prophet(self, logits: torch.Tensor, pos: torch.Tensor, real: torch.Tensor,
                 rows: torch.Tensor) -> torch.Tensor:
        """Prophet's test on the rows (B,) that decode; where it clears, fill the forwarded blocks."""
        t, cfg, bl = self.t, self.cfg, self.bl
        seq, L = t["seq"], t["seq"].shape[1]
        gaps, args = chunked(logits, self.model.mask_id, gaps_and_argmax)  # (B, W) each
        tok = seq.gather(1, pos.clamp(0, L - 1))
        span_masked = (tok == self.model.mask_id) & real & (pos < t["total"][:, None])
        if cfg.region == "block":
            region = span_masked & (torch.arange(pos.shape[1], device=pos.device) < bl)[None]
        elif cfg.region == "window":
            region = span_masked
        else:  # the answer positions, all of them forwarded
            m = monitored_slice(cfg)
            lo = t["plen"][:, None] + m.start
            region = real & (pos >= lo) & (pos < lo + cfg.answer_window)
            region &= (region.sum(1) == cfg.answer_window)[:, None]
        pooled = pool_gaps(gaps, region, cfg.statistic, cfg.quantile)
        steps = (t["last"] - t["first"] + 1) * self.S
        tau = prophet_tau((t["blk"] - t["first"]) * self.S + t["sstep"].clamp(max=self.S - 1), steps,
                          cfg.thresholds, cfg.progress)
        fire = rows & prophet_decision(pooled, tau)
        fill = fire[:, None] & span_masked
        t["seq"] = seq.scatter(1, pos.clamp(0, L - 1), torch.where(fill, args, tok))
        first = fire & ~t["early"]
        t["early"] |= fire
        t["cstep"] = torch.where(first, t["used"], t["cstep"])
        t["cgap"] = torch.where(first, pooled, t["cgap"])
        return fire

    def _advance(self, scoring: torch.Tensor, bad: torch.Tensor, fire: torch.Tensor,
                 edited: torch.Tensor) -> list[bool]:
        """Move rows along: post passes, finished blocks (store, EOS, last block), next blocks."""
        t, cfg, bl = self.t, self.cfg, self.bl
        seq, phase, live = t["seq"], t["phase"], t["live"]
        ok = scoring & ~bad
        L = seq.shape[1]
        cur = t["blk"][:, None] * bl + torch.arange(bl, device=seq.device)
        left = ((seq.gather(1, cur.clamp(max=L - 1)) == self.model.mask_id) & (cur < t["total"][:, None])).sum(1)
        editing = cfg.editing_threshold is not None and cfg.max_post_steps > 0
        emptied = ok & (phase == DECODE) & ~fire & (left == 0)
        to_post = emptied & editing
        t["post"] = torch.where(ok & (phase == POST), t["post"] + 1, torch.where(to_post, 0, t["post"]))
        clean = ok & (phase == POST) & ~edited  # its pass ran on the final tokens: nothing to store
        capped = ok & (phase == POST) & edited & (t["post"] >= cfg.max_post_steps)
        done = fire | (emptied & ~to_post) | clean | capped  # blocks finished this step
        la = torch.clamp(t["last"] - t["blk"], max=cfg.lookahead)
        hi = torch.where(fire, t["blk"] + 1 + la, t["blk"] + 1)  # first block after the finished ones
        stored = live & (phase == STORE)
        # EOS/EoT anywhere in the generated positions so far ends the row (earlier blocks held none)
        j = torch.arange(L, device=seq.device)[None]
        gen = (j >= t["plen"][:, None]) & (j < torch.minimum(hi * bl, t["total"])[:, None])
        has_stop = (torch.isin(seq, torch.tensor(self.stops, device=seq.device)) & gen).any(1)
        ends = done & (has_stop | (hi > t["last"]))
        finished = live & (bad | ends)
        nxt = (done & ~ends & clean) | stored  # go straight on to the next block
        store = done & ~ends & ~clean
        t["blk"] = torch.where(nxt, torch.where(stored, t["store_hi"], hi), t["blk"])
        t["store_hi"] = torch.where(store, hi, t["store_hi"])
        t["phase"] = torch.where(store, STORE, torch.where(nxt, DECODE, torch.where(to_post, POST, phase)))
        t["sstep"] = torch.where(nxt, 0, t["sstep"])
        t["bad"] |= bad
        t["live"] = live & ~finished
        window = seq.gather(1, t["plen"][:, None] + torch.arange(cfg.gen_length, device=seq.device))
        window = torch.where(bad[:, None], window, window_after_stop(window, self.stops, self.model.eos_id))
        t["canvas"] = torch.where(finished[:, None], window, t["canvas"])
        info = torch.stack([finished.long(), t["phase"]], 1).tolist()  # the step's one host read
        for s, (_, ph) in zip(self.slots, info):
            s.phase = ph
        return [bool(f) for f, _ in info]


class BlockHost:
    """Host 'block': one block per step of a block-causal model, on its exact KV cache."""

    name = "block"

    def prepare(self, model: DLM, config: DecodeConfig) -> DecodeConfig:
        """The model's block filled in; non-block models refused."""
        return resolve_block_config(model, config)

    def cache_rows(self, config: DecodeConfig, prompts: list[list[int]]) -> tuple[int, int]:
        """Always cached: batch_size slots, each as long as the longest row's whole blocks."""
        return config.batch_size, max(row_layout(len(p), config)[2] for p in prompts)

    def batch(self, model: DLM, config: DecodeConfig, device: torch.device) -> BlockBatch:
        """An empty pass for one decode call."""
        return BlockBatch(model, config, device)  # type: ignore[arg-type]
