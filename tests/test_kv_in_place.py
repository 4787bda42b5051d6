"""A cached step reads every row's keys/values in place (issue 18, part 4): the rows of a pass sit in
consecutive cache slots, so attention gets a view of the cache, never a gather of every slot's
whole cache per layer per step (for LLaDA-8B at 32 slots x 384 positions, 6.4 GB per step)."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from prophet import DecodeConfig, decode, decode_reference
from prophet.hosts.common import slot_order
from prophet.models.layers import KVCache

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"


@pytest.mark.parametrize("kept,order,src,dst", [
    ([0, 1, 2], [0, 1, 2], [], []),      # nobody left: nothing moves
    ([0, 1], [0, 1], [], []),            # the last row left: nothing moves
    ([0, 2], [0, 2], [2], [1]),          # the middle row left: the last moves into its slot
    ([1, 2, 3], [3, 1, 2], [3], [0]),    # row 0 left: only the last row moves, into its slot
    ([4], [4], [4], [0]),
    ([], [], [], []),
])
def test_slot_order_moves_only_the_rows_beyond_the_new_size(kept, order, src, dst):
    assert slot_order(kept) == (order, src, dst)


class Reads:
    """Wraps SDPA: for each call, whether its keys are a view of a layer's cache."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, real):
        def sdpa(q, k, v, *args, **kwargs):
            caches = [m.k.untyped_storage().data_ptr() for m in self.model.module.modules() if isinstance(m, KVCache)]
            if caches:
                self.calls.append((k.untyped_storage().data_ptr() in caches, k.shape))
            return real(q, k, v, *args, **kwargs)
        return sdpa


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_a_cached_pass_attends_to_the_cache_in_place(cache, monkeypatch):
    if not (CHECKPOINTS / "tiny-llada" / "config.json").exists():
        pytest.skip("tiny-llada not shipped")
    from prophet.models import load_model
    model = load_model(CHECKPOINTS / "tiny-llada", dtype=torch.float32)
    reads = Reads(model)
    monkeypatch.setattr(F, "scaled_dot_product_attention", reads(F.scaled_dot_product_attention))
    prompts = [model.encode(p) for p in ("1 2 3 4", "5 6", "7 8 9 1 2 3", "4 5 6", "7")]
    # 5 rows through 3 slots: rows leave and join (the cache compacts), phases mix (subset passes)
    cfg = DecodeConfig(gen_length=16, steps=16, block_length=8, batch_size=3, cache=cache, rule="prophet",
                       statistic="min", region="window")
    got = decode(model, prompts, cfg)
    in_place = [c for c in reads.calls if c[0]]
    assert in_place and all(shape[0] <= 3 for _, shape in in_place)
    want = decode_reference(model, prompts, cfg)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.steps_used, want.steps_used)
    # rows admitted together stay in step: every pass holds every row, all of them read in place
    for cfg_scale in (0.0, 0.5):  # with CFG too: the conditional and unconditional passes each in place
        reads.calls.clear()
        decode(model, prompts[:3], DecodeConfig(**{**cfg.to_dict(), "rule": "full", "cfg_scale": cfg_scale,
                                                  "thresholds": tuple(cfg.thresholds), "anchor_ids": ()}))
        assert reads.calls and all(c[0] for c in reads.calls), "a cached pass gathered the cache"
