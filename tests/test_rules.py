"""Commit rules, confidences and samplers as pure functions."""
import math

import pytest
import torch

from prophet.config import DecodeConfig
from prophet.rules import (budget_floor, cfg_mix, compact, count_generated, dream_confidence, dream_probs,
                           gumbel_argmax, gumbel_perturb, pool_gaps, prophet_decision, rank_desc, sample_from_probs,
                           select_positions, softmax_of, top2_gap, top_k_filter, top_p_filter)


def test_top2_gap_is_first_minus_second_logit():
    logits = torch.tensor([[1.0, 5.0, 3.0], [2.0, 2.0, -1.0]])
    assert top2_gap(logits).tolist() == [2.0, 0.0]


def test_pool_mean_min_quantile_over_the_region_only():
    gaps = torch.tensor([[1.0, 2.0, 100.0, 4.0], [5.0, 0.0, 0.0, 0.0]])
    region = torch.tensor([[True, True, False, True], [True, False, False, False]])
    assert torch.allclose(pool_gaps(gaps, region, "mean"), torch.tensor([7 / 3, 5.0]))
    assert pool_gaps(gaps, region, "min").tolist() == [1.0, 5.0]
    want = torch.quantile(torch.tensor([1.0, 2.0, 4.0]), 0.25)
    assert torch.isclose(pool_gaps(gaps, region, "quantile", 0.25)[0], want)
    assert pool_gaps(gaps, region, "quantile", 0.9)[1] == 5.0


@pytest.mark.parametrize("stat", ["mean", "min", "quantile"])
def test_pool_of_an_empty_region_is_nan_and_never_commits(stat):
    gaps = torch.tensor([[9.0, 9.0], [9.0, 9.0]])
    region = torch.tensor([[False, False], [True, True]])
    pooled = pool_gaps(gaps, region, stat, 0.5)
    assert math.isnan(pooled[0]) and pooled[1] == 9.0
    assert prophet_decision(pooled, torch.tensor([0.0, 0.0], dtype=torch.float64)).tolist() == [False, True]


@pytest.mark.parametrize("stat", ["mean", "min", "quantile"])
def test_pool_is_bit_identical_with_padding(stat):
    g = torch.rand(1, 37) * 10
    padded = torch.cat([g, torch.rand(1, 11) * 10], 1)
    region = torch.cat([torch.ones(1, 37, dtype=torch.bool), torch.zeros(1, 11, dtype=torch.bool)], 1)
    assert torch.equal(pool_gaps(g, torch.ones_like(g, dtype=torch.bool), stat, 0.3), pool_gaps(padded, region, stat, 0.3))


def test_pool_quantile_matches_torch_quantile():
    g = torch.randn(5, 23)
    for q in (0.0, 0.1, 0.5, 0.77, 1.0):
        want = torch.quantile(g.double(), q, dim=1).float()
        assert torch.allclose(pool_gaps(g, torch.ones_like(g, dtype=torch.bool), "quantile", q), want, atol=1e-6)


def test_prophet_decision_commits_at_equality_and_compares_in_float64():
    pooled = torch.tensor([5.0, 4.999, float("nan"), 7.1], dtype=torch.float32)
    tau = torch.tensor([5.0, 5.0, 0.0, 7.1], dtype=torch.float64)
    # float32(7.1) is below 7.1: a float32 comparison would commit, the threshold as written does not
    assert prophet_decision(pooled, tau).tolist() == [True, False, False, False]


def test_compact_puts_selected_positions_first_in_order():
    mask = torch.tensor([[False, True, False, True, True], [True, False, False, False, False]])
    idx, valid = compact(mask, 3)
    assert idx[0].tolist() == [1, 3, 4] and valid[0].all()
    assert idx[1, 0] == 0 and valid[1].tolist() == [True, False, False]


def test_rank_orders_by_tier_then_key_with_ties_by_position():
    key = torch.tensor([[0.5, 0.9, 0.9, 0.1, 0.99]])
    tier = torch.tensor([[2, 2, 2, 2, 1]])  # the last one is demoted (EOS): ranked after all others
    assert rank_desc(key, tier).tolist() == [[2, 0, 1, 3, 4]]
    tier0 = torch.tensor([[2, 0, 2, 2, 2]])  # padded slot: last whatever its key
    assert rank_desc(key, tier0)[0, 1] == 4


def test_select_takes_k_best_valid_plus_extra():
    rank = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    extra = torch.tensor([[False, False, False, True], [True, False, False, False]])
    sel = select_positions(rank, valid, torch.tensor([2, 1]), extra)
    assert sel.tolist() == [[True, True, False, False], [True, False, False, True]]


def test_budget_floor_is_ceil_of_remaining_over_steps_left():
    assert budget_floor(torch.tensor([7, 7, 0, 3]), torch.tensor([2, 7, 3, 1])).tolist() == [4, 1, 0, 3]


def test_gumbel_argmax_is_spec_form_and_samples_the_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    u = torch.tensor([[0.3, 0.6, 0.2]], dtype=torch.float64)
    want = (logits.double().exp() / (-torch.log(u)) ** 0.7).argmax(-1)
    assert torch.equal(gumbel_argmax(logits, u, 0.7), want)
    g = torch.Generator().manual_seed(0)
    draws = gumbel_argmax(logits.expand(20000, 3), torch.rand(20000, 3, generator=g, dtype=torch.float64), 1.0)
    freq = torch.bincount(draws, minlength=3).double() / 20000
    assert torch.allclose(freq, torch.softmax(logits[0].double(), 0), atol=0.015)


def test_softmax_of_is_the_probability_of_the_token():
    logits = torch.tensor([[0.0, math.log(3.0)]])
    assert torch.allclose(softmax_of(logits, torch.tensor([1])), torch.tensor([0.75]))


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = top_p_filter(logits, 0.7) > torch.finfo(torch.float32).min
    assert kept.tolist() == [[True, True, False, False]]
    assert (top_p_filter(logits, 0.45) > -1e30).tolist() == [[True, False, False, False]]


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0]])
    assert (top_k_filter(logits, 2) > -1e30).tolist() == [[False, True, True, False]]
    assert torch.equal(top_k_filter(logits, 10), logits)


def test_dream_probs_temperature_then_filters_then_softmax():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    assert torch.allclose(dream_probs(logits, 0.5, None, None), torch.softmax(logits / 0.5, -1))
    p = dream_probs(logits, 1.0, None, 2)
    assert p[0, 0] == 0 and p[0, 3] == 0 and torch.isclose(p.sum(), torch.tensor(1.0))
    assert torch.allclose(dream_probs(logits, 0.0, None, None), torch.softmax(logits, -1))


def test_sample_from_probs_follows_the_probs_and_never_picks_zero():
    probs = torch.tensor([0.2, 0.0, 0.8]).expand(20000, 3)
    g = torch.Generator().manual_seed(1)
    draws = sample_from_probs(probs, torch.rand(20000, 3, generator=g, dtype=torch.float64))
    freq = torch.bincount(draws, minlength=3).double() / 20000
    assert freq[1] == 0 and abs(freq[2] - 0.8) < 0.015


def test_dream_confidences():
    probs = torch.tensor([[0.7, 0.2, 0.1]])
    x0 = torch.tensor([0])
    assert torch.isclose(dream_confidence(probs, x0, "maskgit_plus"), torch.tensor(0.7))
    assert torch.isclose(dream_confidence(probs, x0, "topk_margin"), torch.tensor(0.5))
    want = sum(p * math.log(p + 1e-10) for p in (0.7, 0.2, 0.1))
    assert torch.isclose(dream_confidence(probs, x0, "entropy"), torch.tensor(want))
    with pytest.raises(ValueError):
        dream_confidence(probs, x0, "origin")


def test_gumbel_perturb_first_pick_follows_softmax_of_key_over_alg_temp():
    key = torch.tensor([0.9, 0.5, 0.1])
    g = torch.Generator().manual_seed(2)
    u = torch.rand(20000, 3, generator=g, dtype=torch.float64)
    first = gumbel_perturb(key.expand(20000, 3), u, 0.25).argmax(-1)
    freq = torch.bincount(first, minlength=3).double() / 20000
    assert torch.allclose(freq, torch.softmax(key.double() / 0.25, 0), atol=0.015)


def test_count_generated_stops_at_the_first_stop_id():
    tokens = torch.tensor([[5, 6, 2, 7], [5, 3, 2, 2], [5, 6, 7, 8]])
    assert count_generated(tokens, (2, 3)).tolist() == [2, 1, 4]


def test_cfg_mix_extrapolates_away_from_the_unconditional():
    assert cfg_mix(torch.tensor([2.0]), torch.tensor([1.0]), 1.5).tolist() == [3.5]


def test_eos_eot_confidence_is_llada_references_renormalised_softmax():
    # LLaDA's generate: x0 = argmax, then logits[:, eos] = logits[:, eot] = -inf, p = softmax(logits)
    # [x0]; a position proposing EOS gets 0 and the others are renormalised, which can reorder them
    from prophet.rules import propose
    eos, eot = 0, 1
    x = torch.tensor([[4.0, 3.9, 3.0, 0.0, 0.0],    # proposes EOS
                      [3.0, -9.0, 3.05, -9.0, -9.0],  # token 2, half its mass on EOS
                      [-9.0, -9.0, -9.0, 3.0, 0.0]])  # token 3
    cfg = DecodeConfig(gen_length=8, steps=8, confidence_eos_eot_inf=True)
    got = propose(x, cfg, None, (eos, eot))
    ref = x.clone()
    x0 = ref.argmax(-1)
    ref[:, [eos, eot]] = float("-inf")
    want = torch.log_softmax(ref, -1).gather(-1, x0[:, None])[:, 0]
    assert got.x0.tolist() == [0, 2, 3] and torch.allclose(got.logp, want) and got.logp[0] == float("-inf")
    plain = propose(x, DecodeConfig(gen_length=8, steps=8), None, (eos, eot)).logp
    assert plain[1] < plain[2] and got.logp[1] > got.logp[2]  # renormalising reorders rows 1 and 2


def test_log_probabilities_rank_confident_positions_that_float32_probabilities_tie():
    # SPEC 7: softmax in float32 gives 1.0 to both rows; the float64 reference tells them apart
    from prophet.rules import log_prob_of
    x = torch.tensor([[20.0, 0.0, 0.0, 0.0], [21.0, 0.0, 0.0, 0.0], [3.0, 2.0, 1.0, 0.0]])
    x0 = torch.tensor([0, 0, 1])
    p32 = torch.softmax(x, -1).gather(-1, x0[:, None])[:, 0]
    assert p32[0] == p32[1] == 1.0
    got = log_prob_of(x, x0)
    want = torch.log_softmax(x.double(), -1).gather(-1, x0[:, None])[:, 0]
    assert got[0] < got[1] < 0 and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=0)
