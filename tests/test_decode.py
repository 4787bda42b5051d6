"""The batched decoder against the one-row oracle, on the scripted model, over the whole option grid."""
import itertools
import os
import zlib
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prophet import ConfigError, DecodeConfig, decode, decode_reference
from prophet.scripted import ScriptedDLM



from tiny_support import one_thread  # noqa: E402,F401 (an autouse fixture: one intra-op thread)


FIELDS = ("tokens", "steps_used", "committed_early", "commit_step", "nonfinite", "num_generated")


def assert_same(a, b):
    """Every per-row outcome equal (the pooled gap to float tolerance, NaN where no commit)."""
    for f in FIELDS + ("forward_tokens",):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert torch.allclose(a.commit_gap, b.commit_gap, equal_nan=True)


def prompts_for(seed, n, max_len=9, vocab=32):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(4, vocab, (k,), generator=g).tolist() for k in lens]


def check_against_oracle(cfg, prompts, seeds=None, model=None):
    """decode (continuous and frozen) equals decode_reference; returns the continuous result."""
    model = model or ScriptedDLM(cfg.gen_length)
    want = decode_reference(model, prompts, cfg, seeds=seeds)
    got = decode(model, prompts, DecodeConfig(**{**cfg.to_dict(), "continuous": True}), seeds=seeds)
    assert_same(got, want)
    frozen = decode(model, prompts, DecodeConfig(**{**cfg.to_dict(), "continuous": False}), seeds=seeds)
    assert_same(frozen, want)
    assert (got.steps_used <= cfg.steps).all() and (got.steps_used >= 1).all()
    passes = 2 if cfg.cfg_scale > 0 else 1
    assert got.forward_rows == passes * int(got.steps_used.sum())  # finished rows leave the pass at once
    if cfg.cache == "none":  # every pass runs the row's whole sequence
        lengths = torch.tensor([len(p) + cfg.gen_length for p in prompts])
        assert torch.equal(got.forward_tokens, passes * got.steps_used * lengths)
    assert frozen.forward_rows >= got.forward_rows
    return got


HOST_ALGS = [("llada", {"remasking": "low_confidence"}), ("llada", {"remasking": "random"}),
             ("dream", {"alg": "origin"}), ("dream", {"alg": "maskgit_plus"}),
             ("dream", {"alg": "topk_margin"}), ("dream", {"alg": "entropy"})]
RULES = ["full", "gap_parallel", "confidence_threshold"]
PROPHET = [dict(region=r, statistic=s) for r, s in itertools.product(["anchor", "window", "block"],
                                                                      ["mean", "min", "quantile"])]
GRID = ([(h, a, dict(rule=r)) for (h, a), r in itertools.product(HOST_ALGS, RULES)]
        + [(h, a, dict(rule="prophet", **p)) for (h, a), p in itertools.product(HOST_ALGS, PROPHET)])


@pytest.mark.parametrize("host,alg,rule", GRID, ids=[f"{h}-{list(a.values())[0]}-{'-'.join(r.values())}"
                                                     for h, a, r in GRID])
def test_greedy_batched_equals_oracle_for_every_host_and_rule(host, alg, rule):
    blocks = dict(block_length=4, steps=8) if host == "llada" else dict(steps=12)
    anchor = dict(anchor_ids=(7, 8), answer_window=3) if rule.get("region") == "anchor" else {}
    cfg = DecodeConfig(host=host, gen_length=16, batch_size=3, **blocks, **alg, **rule, **anchor)
    got = check_against_oracle(cfg, prompts_for(hash((host, str(alg), str(rule))) % 1000, 7))
    if rule["rule"] == "prophet":
        assert not (got.tokens == ScriptedDLM.mask_id).any()


@st.composite
def cases(draw):
    """A random config over every option, random prompts, and a random batch size."""
    host = draw(st.sampled_from(["llada", "dream"]))
    G = draw(st.sampled_from([8, 12, 16]))
    kw = dict(host=host, gen_length=G, batch_size=draw(st.integers(1, 5)),
              rule=draw(st.sampled_from(["full", "prophet", "gap_parallel", "confidence_threshold"])),
              region=draw(st.sampled_from(["anchor", "window", "block"])),
              statistic=draw(st.sampled_from(["mean", "min", "quantile"])),
              quantile=draw(st.sampled_from([0.0, 0.25, 0.5])),
              thresholds=draw(st.sampled_from([(8.0, 5.0, 3.0), (6.0, 4.0, 2.0), (20.0, 9.0, 7.1)])),
              confidence=draw(st.sampled_from([0.5, 0.9])),
              temperature=draw(st.sampled_from([0.0, 0.0, 0.5, 1.0])),
              cfg_scale=draw(st.sampled_from([0.0, 0.0, 1.0])),
              logits_eos_inf=draw(st.booleans()), confidence_eos_eot_inf=draw(st.booleans()),
              continuous=draw(st.booleans()), cache=draw(st.sampled_from(["none", "prefix", "dual"])),
              cache_refresh_every=draw(st.sampled_from([None, None, 1, 2])))
    bl = draw(st.sampled_from([d for d in (2, 4, G // 2, G) if G % d == 0]))
    nb = G // bl
    kw.update(block_length=bl, steps=nb * draw(st.integers(1, bl)))
    if host == "llada":
        kw.update(remasking=draw(st.sampled_from(["low_confidence", "random"])))
    else:
        kw.update(alg=draw(st.sampled_from(["origin", "maskgit_plus", "topk_margin", "entropy"])),
                  alg_temp=draw(st.sampled_from([0.0, 0.0, 0.5])), top_p=draw(st.sampled_from([None, 0.8])),
                  top_k=draw(st.sampled_from([None, 5])))
    if kw["region"] == "anchor" or draw(st.booleans()):
        n_anchor, window = draw(st.integers(1, 2)), draw(st.integers(1, 3))
        offset = draw(st.one_of(st.none(), st.integers(0, G - n_anchor - 1 - window)))
        kw.update(anchor_ids=tuple(range(20, 20 + n_anchor)), answer_window=window, anchor_offset=offset)
    n = draw(st.integers(1, 7))
    prompts = [draw(st.lists(st.integers(4, 31), min_size=1, max_size=10)) for _ in range(n)]
    seeds = draw(st.lists(st.integers(0, 2**40), min_size=n, max_size=n))
    return DecodeConfig(**kw), prompts, seeds


# PROPHET_EXAMPLES=2000 for a deeper local search
@settings(max_examples=int(os.environ.get("PROPHET_EXAMPLES", 80)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_batched_equals_oracle_on_random_configs_prompts_and_batch_sizes(case):
    cfg, prompts, seeds = case
    check_against_oracle(cfg, prompts, seeds)


CACHE_GRID = [(h, a, c, r, lay) for (h, a), c, r, lay in itertools.product(
    [("llada", {"remasking": "low_confidence"}), ("dream", {"alg": "maskgit_plus"}), ("dream", {"alg": "entropy"})],
    ["prefix", "dual"],
    [dict(rule="full"), dict(rule="confidence_threshold", confidence=0.5),
     dict(rule="prophet", region="window", statistic="min"), dict(rule="prophet", region="block"),
     dict(rule="prophet", region="anchor", anchor_ids=(7, 8), answer_window=3)],
    [dict(block_length=4, steps=8), dict(block_length=8, steps=16), dict(block_length=16, steps=8)])]


@pytest.mark.parametrize("host,alg,cache,rule,layout", CACHE_GRID,
                         ids=[f"{h}-{list(a.values())[0]}-{c}-{'-'.join(map(str, r.values()))}-bl{lay['block_length']}"
                              for h, a, c, r, lay in CACHE_GRID])
def test_cached_batched_equals_cached_oracle(host, alg, cache, rule, layout):
    # 9 prompts of 1-12 tokens through 3 slots: rows at different blocks and phases share passes,
    # and slots are reused as rows leave and join
    cfg = DecodeConfig(host=host, gen_length=16, batch_size=3, cache=cache, thresholds=(6.0, 4.0, 2.0),
                       **layout, **alg, **rule)
    prompts = prompts_for(zlib.crc32(f"{host}{cache}{rule}".encode()) % 1000, 9, max_len=12)  # fixed per case
    got = check_against_oracle(cfg, prompts)
    none = decode(ScriptedDLM(16), prompts, DecodeConfig(**{**cfg.to_dict(), "cache": "none"}))
    whole = torch.tensor([len(p) + 16 for p in prompts])  # what an uncached pass runs
    assert (got.forward_tokens <= got.steps_used * whole).all()
    if cfg.rule == "full":  # a fixed schedule: the same steps, each no dearer than uncached
        assert torch.equal(got.steps_used, none.steps_used) and (got.forward_tokens <= none.forward_tokens).all()
    if got.steps_used.max() > 1 and layout["block_length"] < 16:
        assert (got.forward_tokens < none.forward_tokens).any()


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("host", ["llada", "dream"])
def test_refreshing_every_step_gives_exactly_the_tokens_of_no_cache(cache, host):
    base = dict(host=host, gen_length=16, block_length=4, steps=16, batch_size=4, rule="prophet",
                thresholds=(6.0, 4.0, 2.0), temperature=0.5)
    prompts = prompts_for(11, 10)
    none = decode(ScriptedDLM(16), prompts, DecodeConfig(**base))
    every = decode(ScriptedDLM(16), prompts, DecodeConfig(**base, cache=cache, cache_refresh_every=1))
    assert_same(every, none)


def test_dual_cache_reads_a_stale_suffix():
    # the scripted model reads positions not run since the block's refresh as they were then, so
    # a dual cache must change some rows (it is an approximation), a prefix cache none here
    base = dict(gen_length=16, block_length=4, steps=16, batch_size=4)
    prompts = prompts_for(12, 24)
    none = decode(ScriptedDLM(16), prompts, DecodeConfig(**base, rule="prophet", statistic="min"))
    dual = decode(ScriptedDLM(16), prompts, DecodeConfig(**base, rule="prophet", statistic="min", cache="dual"))
    assert not torch.equal(dual.steps_used, none.steps_used) or not torch.equal(dual.tokens, none.tokens)


def test_a_model_without_a_cache_is_refused_clearly():
    class NoCache:
        family, default_host = "plain", "llada"
        pad_id, mask_id, eos_id, eot_id, vocab_size, max_length = 0, 1, 2, 3, 32, 512
        device = torch.device("cpu")

        def logits(self, ids, attention_mask, last=None):
            raise AssertionError("no forward pass may run")

    with pytest.raises(ConfigError, match="cache='none'"):
        decode(NoCache(), [[4, 5]], DecodeConfig(gen_length=8, steps=8, cache="prefix"))


def test_a_rows_output_does_not_depend_on_its_neighbours():
    cfg = DecodeConfig(host="llada", gen_length=16, steps=16, block_length=8, rule="prophet", temperature=0.8,
                       remasking="random", batch_size=4)
    model = ScriptedDLM(16)
    prompts = prompts_for(5, 9)
    seeds = list(range(100, 109))
    full = decode(model, prompts, cfg, seeds=seeds)
    for i in (0, 4, 8):
        alone = decode(model, [prompts[i]], cfg, seeds=[seeds[i]])
        assert torch.equal(alone.tokens[0], full.tokens[i]) and alone.steps_used[0] == full.steps_used[i]
    shuffled = decode(model, prompts[::-1], DecodeConfig(**{**cfg.to_dict(), "batch_size": 3}), seeds=seeds[::-1])
    assert torch.equal(shuffled.tokens.flip(0), full.tokens)


def test_prophet_commits_at_mixed_steps_on_the_scripted_model():
    cfg = DecodeConfig(gen_length=16, steps=16, rule="prophet", batch_size=8)
    res = decode(ScriptedDLM(16), prompts_for(1, 40), cfg)
    steps = set(res.commit_step[res.committed_early].tolist())
    assert len(steps) >= 4 and not res.committed_early.all()


def test_seeds_default_to_row_index_and_can_come_from_a_generator():
    cfg = DecodeConfig(gen_length=8, steps=8, temperature=1.0, batch_size=2)
    model, prompts = ScriptedDLM(8), prompts_for(2, 5)
    assert torch.equal(decode(model, prompts, cfg).tokens, decode(model, prompts, cfg, seeds=range(5)).tokens)
    a = decode(model, prompts, cfg, generator=torch.Generator().manual_seed(9))
    b = decode_reference(model, prompts, cfg, generator=torch.Generator().manual_seed(9))
    assert_same(a, b)
    other = decode(model, prompts, cfg, seeds=[7, 8, 9, 10, 11])
    assert not torch.equal(other.tokens, a.tokens)


def test_anchor_is_written_into_the_window_and_kept():
    cfg = DecodeConfig(gen_length=16, steps=16, rule="prophet", region="anchor", anchor_ids=(9, 10, 11),
                       answer_window=4, anchor_offset=5)
    res = decode(ScriptedDLM(16), prompts_for(3, 4), cfg)
    assert (res.tokens[:, 5:8] == torch.tensor([9, 10, 11])).all()


def test_nonfinite_rows_stop_with_a_flag_and_leave_the_others_alone():
    model = ScriptedDLM(12, nonfinite_token=5)
    clean = [[6, 7, 8], [9], [10, 11]]
    prompts = [clean[0], [5, 4, 4], clean[1], [5], clean[2]]
    cfg = DecodeConfig(gen_length=12, steps=12, rule="prophet", batch_size=2, cfg_scale=1.0)
    res = check_against_oracle(cfg, prompts, model=model)
    assert res.nonfinite.tolist() == [False, True, False, True, False]
    assert res.steps_used[1] == 1 and not res.committed_early[1]
    assert (res.tokens[1] == model.mask_id).all()
    ok = decode(model, clean, cfg, seeds=[0, 2, 4])
    assert torch.equal(ok.tokens, res.tokens[[0, 2, 4]])


def test_frozen_batches_cost_the_slowest_row():
    cfg = DecodeConfig(gen_length=16, steps=16, rule="prophet", batch_size=4, continuous=False)
    res = decode(ScriptedDLM(16), prompts_for(4, 8), cfg)
    want = sum(len(chunk) * int(chunk.max()) for chunk in res.steps_used.split(4))
    assert res.forward_rows == want
    assert (res.decode_seconds > 0).all()


class ConstantGapDLM(ScriptedDLM):
    """Every window position scores token 4 with a fixed logit gap over all others."""

    def __init__(self, gen_length, gap):
        super().__init__(gen_length)
        self.gap = gap

    def logits(self, ids, attention_mask, last=None):
        out = torch.zeros(ids.shape[0], last or ids.shape[1], self.vocab_size)
        out[..., 4] = self.gap
        return out


@pytest.mark.parametrize("gap,steps,want", [(8.0, 12, 1), (7.9, 12, 5), (5.0, 12, 5), (4.9, 12, 9),
                                            (3.0, 12, 9), (2.9, 12, -1), (5.0, 10, 5), (3.0, 10, 8)])
def test_prophet_commits_at_the_first_step_whose_third_admits_the_gap(gap, steps, want):
    cfg = DecodeConfig(gen_length=12, steps=steps, rule="prophet", thresholds=(8.0, 5.0, 3.0))
    res = decode(ConstantGapDLM(12, gap), [[4, 5]], cfg)
    # p = (step - 1) / steps; the mid threshold applies from p >= 1/3, the low one from p >= 2/3
    assert res.commit_step.tolist() == [want]
    assert_same(res, decode_reference(ConstantGapDLM(12, gap), [[4, 5]], cfg))


def test_parallel_rules_commit_more_per_step_but_stay_within_budget():
    base = dict(gen_length=16, steps=16, block_length=8, batch_size=4)
    prompts = prompts_for(6, 6)
    full = decode(ScriptedDLM(16), prompts, DecodeConfig(**base))
    for rule in ("gap_parallel", "confidence_threshold"):
        res = decode(ScriptedDLM(16), prompts, DecodeConfig(**base, rule=rule, thresholds=(3.0, 3.0, 3.0),
                                                            confidence=0.5))
        assert (res.steps_used < full.steps_used).any() and (res.steps_used <= 16).all()
        assert not (res.tokens == ScriptedDLM.mask_id).any()


class CountingDLM(ScriptedDLM):
    calls = 0

    def logits(self, ids, attention_mask, last=None):
        CountingDLM.calls += 1
        return super().logits(ids, attention_mask, last)


class PadIsMask(ScriptedDLM):
    pad_id = ScriptedDLM.mask_id


@pytest.mark.parametrize("model,prompts,cfg,words", [
    (PadIsMask(8), [[4]], DecodeConfig(gen_length=8, steps=8), ["pad_id", "mask_id"]),
    (CountingDLM(8), [[4], []], DecodeConfig(gen_length=8, steps=8), ["prompts[1]", "empty"]),
    (ScriptedDLM(8, max_length=12), [[4] * 5], DecodeConfig(gen_length=8, steps=8), ["max_length", "shorten"]),
    (ScriptedDLM(8), [[4, 99]], DecodeConfig(gen_length=8, steps=8), ["vocabulary", "prompts[0]"]),
    (ScriptedDLM(8), [[4]], DecodeConfig(gen_length=8, steps=8, anchor_ids=(1,)), ["anchor_ids", "mask id"]),
])
def test_invalid_requests_are_refused_before_any_forward_pass(model, prompts, cfg, words):
    CountingDLM.calls = 0
    for fn in (decode, decode_reference):
        with pytest.raises(ConfigError) as err:
            fn(model, prompts, cfg)
        assert all(w in str(err.value) for w in words), str(err.value)
    assert CountingDLM.calls == 0


def test_seed_count_must_match_the_prompts():
    with pytest.raises(ConfigError, match="seeds"):
        decode(ScriptedDLM(8), [[4], [5]], DecodeConfig(gen_length=8, steps=8), seeds=[1])


def test_no_prompts_gives_an_empty_result():
    res = decode(ScriptedDLM(8), [], DecodeConfig(gen_length=8, steps=8))
    assert res.tokens.shape == (0, 8) and res.forward_rows == 0 and len(res) == 0
