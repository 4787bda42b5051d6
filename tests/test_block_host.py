"""The block host (issue 18): the batched, cached decoder equals the one-row oracle that recomputes
every prefix (LLaDA2's reference way) token for token, over rules x regions x look-ahead x editing x
prompt lengths x block lengths x slot counts; its cost accounting; its refusals."""
import os
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prophet import ConfigError, DecodeConfig, decode, decode_reference
from prophet.models import NativeAdapter, char_tokenizer
from prophet.models.layers import KVCache
from prophet.scripted import ScriptedDLM
from tests.test_llada2 import tiny_llada2


from tiny_support import one_thread  # noqa: E402,F401 (an autouse fixture: one intra-op thread)


@lru_cache(maxsize=None)
def confident_llada2(block_length: int, eos_often: bool = False, dtype: torch.dtype = torch.float64) -> NativeAdapter:
    """A random tiny LLaDA2 in float64 (the cache and the recomputed prefix then agree far below
    any ranking gap), its head scaled so that probabilities and gaps span the rules' thresholds;
    `eos_often`: EOS's head row next to that of the token masks favour most, so rows stop early."""
    module = tiny_llada2(seed=block_length, block_length=block_length).to(dtype)
    tok = char_tokenizer()
    with torch.no_grad():
        module.lm_head.weight.mul_(40)
        if eos_often:
            probe = torch.tensor([tok.encode("what is 12+30?") + [module.config.mask_token_id] * 12])
            favourite = module(probe)[0, -12:].argmax(-1).mode().values
            w = module.lm_head.weight
            noise = torch.randn(w.shape[1], dtype=w.dtype, generator=torch.Generator().manual_seed(0))
            w[module.config.eos_token_id] = w[favourite] * 0.99 + 0.02 * noise
    return NativeAdapter(module, tok)


FIELDS = ("tokens", "committed_early", "nonfinite", "num_generated")


def check(model, prompts, cfg, seeds=None):
    """decode (continuous and frozen) equals the oracle's tokens and outcomes; returns (fast, oracle)."""
    want = decode_reference(model, prompts, cfg, seeds=seeds)
    for continuous in (True, False):
        got = decode(model, prompts, DecodeConfig(**{**cfg.to_dict(), "continuous": continuous,
                                                    "thresholds": cfg.thresholds, "anchor_ids": cfg.anchor_ids}),
                     seeds=seeds)
        for f in FIELDS:
            assert torch.equal(getattr(got, f), getattr(want, f)), (f, continuous)
        assert torch.allclose(got.commit_gap, want.commit_gap, equal_nan=True)
        assert ((got.commit_step > 0) == got.committed_early).all()
    return got, want


@st.composite
def cases(draw):
    """A random block-host config, prompts of 1-14 tokens and a slot count."""
    bl = draw(st.sampled_from([2, 3, 4]))
    nb = draw(st.integers(1, 3))
    G = bl * nb
    rule = draw(st.sampled_from(["full", "confidence_threshold", "prophet"]))
    kw = dict(host="block", gen_length=G, steps=nb * draw(st.integers(1, bl)), rule=rule,
              batch_size=draw(st.integers(1, 4)), lookahead=draw(st.sampled_from([0, 0, 1, 2])),
              region=draw(st.sampled_from(["block", "window", "anchor"])),
              statistic=draw(st.sampled_from(["mean", "min", "quantile"])),
              parallel=draw(st.sampled_from(["none", "confidence_threshold"])),
              confidence=draw(st.sampled_from([0.5, 0.8, 0.95])),
              thresholds=draw(st.sampled_from([(3.0, 2.0, 1.0), (2.0, 1.5, 0.5), (9.0, 9.0, 9.0)])),
              temperature=draw(st.sampled_from([0.0, 0.0, 0.0, 0.7])),
              progress=draw(st.sampled_from(["exact", "reference"])))
    if draw(st.booleans()):
        kw.update(editing_threshold=draw(st.sampled_from([0.3, 0.6])), max_post_steps=draw(st.integers(0, 3)))
    if kw["region"] == "anchor" or draw(st.booleans()):
        window = draw(st.integers(1, 2))
        if G >= window + 2:
            kw.update(anchor_ids=(20,), answer_window=window,
                      anchor_offset=draw(st.integers(0, G - 2 - window)))
        else:
            kw["region"] = "block"
    n = draw(st.integers(1, 6))
    prompts = [draw(st.lists(st.integers(4, 60), min_size=1, max_size=14)) for _ in range(n)]
    return DecodeConfig(**kw), prompts, draw(st.booleans())


# PROPHET_EXAMPLES=500 for a deeper local search
@settings(max_examples=int(os.environ.get("PROPHET_EXAMPLES", 40)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_cached_block_decode_equals_the_recomputing_oracle(case):
    cfg, prompts, eos_often = case
    check(confident_llada2(cfg.gen_length // cfg.num_blocks, eos_often), prompts, cfg,
          seeds=list(range(7, 7 + len(prompts))))


@pytest.mark.parametrize("kw", [
    dict(rule="prophet", region="block", thresholds=(2.0, 1.5, 1.0)),
    dict(rule="prophet", region="window", lookahead=1, thresholds=(2.0, 1.5, 1.0), parallel="confidence_threshold",
         confidence=0.8),
    dict(rule="confidence_threshold", confidence=0.6, editing_threshold=0.3, max_post_steps=2),
])
def test_rules_fire_on_the_confident_model(kw):
    # the grid is only as good as its cases: these settings commit early, edit and stop at EOS
    model = confident_llada2(4, eos_often=True)
    prompts = [model.encode(s) for s in ("what is 12+30?", "hi", "abcdefg", "x", "0123")]
    cfg = DecodeConfig(host="block", gen_length=16, steps=16, batch_size=3, **kw)
    got, want = check(model, prompts, cfg)
    for row, n in zip(got.tokens, got.num_generated.tolist()):
        assert (row[n + 1:] == model.eos_id).all()  # after the first EOS the window is EOS
    if "editing_threshold" in kw:  # edits fire (here they even rewrite EOS) and cost post passes
        plain = decode(model, prompts, DecodeConfig(**{**cfg.to_dict(), "editing_threshold": None, "anchor_ids": ()}))
        assert not torch.equal(plain.tokens, got.tokens) and (got.steps_used >= plain.steps_used).all()
        return
    assert got.committed_early.any() and (got.num_generated < 16).any()  # some rows stopped at EOS
    full = decode(model, prompts, DecodeConfig(host="block", gen_length=16, steps=16, batch_size=3))
    assert (got.steps_used <= full.steps_used).all()


def test_every_pass_is_counted_prefill_blocks_and_stores():
    # full rule, no look-ahead, no editing: the cache decoder runs the prefill (whole prompt blocks),
    # the same decode passes as the oracle, and one store per finished block that is not the row's last
    bl = 4
    model = confident_llada2(bl)
    prompts = [model.encode(s) for s in ("abcde", "ab", "abcdefghi", "abcd")]
    cfg = DecodeConfig(host="block", gen_length=8, steps=8, batch_size=2)
    got, want = check(model, prompts, cfg)
    for p, steps, ftok, ref_steps, ref_ftok, n in zip(prompts, got.steps_used.tolist(), got.forward_tokens.tolist(),
                                                      want.steps_used.tolist(), want.forward_tokens.tolist(),
                                                      got.num_generated.tolist()):
        P = len(p)
        prefill = P // bl * bl
        end = P + n if n < 8 else P + 8 + (-(P + 8)) % bl - 1  # the last position decoded
        blocks = end // bl - P // bl + 1
        assert steps == (prefill > 0) + ref_steps + blocks - 1
        assert ftok == prefill + bl * (steps - (prefill > 0))
        assert ref_ftok >= ftok
    assert want.forward_tokens.sum() > got.forward_tokens.sum()  # recomputing every prefix costs more


def test_a_block_pass_reads_the_cache_in_place(monkeypatch):
    model = confident_llada2(4)
    calls = []
    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, *args, **kwargs):
        caches = [m.k.untyped_storage().data_ptr() for m in model.module.modules() if isinstance(m, KVCache)]
        if caches:
            calls.append(k.untyped_storage().data_ptr() in caches)
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    prompts = [model.encode(s) for s in ("what is 12+30?", "hi", "abcdefg", "x", "0123", "yz")]
    decode(model, prompts, DecodeConfig(host="block", gen_length=12, steps=12, batch_size=3, rule="prophet",
                                        region="block", thresholds=(2.0, 1.5, 1.0)))
    assert calls and all(calls), "a cached pass gathered the cache"


def test_block_host_defaults_and_refusals():
    model = confident_llada2(4)
    assert DecodeConfig(host="block").confidence == 0.95 and DecodeConfig().confidence == 0.9
    with pytest.raises(ConfigError, match="decoding.block_length"):
        decode(model, [[5]], DecodeConfig(host="block", gen_length=8, steps=8, block_length=2))
    with pytest.raises(ConfigError, match="bidirectional"):
        decode(ScriptedDLM(8), [[5]], DecodeConfig(host="block", gen_length=8, steps=8))
    for bad, field in [(dict(cache="prefix"), "cache"), (dict(cfg_scale=1.0), "cfg_scale"),
                       (dict(rule="gap_parallel"), "gap_parallel"), (dict(editing_threshold=1.5), "editing_threshold")]:
        with pytest.raises(ConfigError, match=field):
            DecodeConfig(host="block", **bad)
    with pytest.raises(ConfigError, match="host 'block'"):
        DecodeConfig(host="llada", lookahead=1)


@pytest.mark.ray
@pytest.mark.slow
def test_the_job_decodes_a_block_model_on_its_own_host(ray_local, tmp_path, task_rows):
    # a random tiny LLaDA2 saved as a model directory: decoding.host unset takes the family's 'block';
    # per-row steps and forward tokens reach the output; a wrong block_length is refused up front
    import pyarrow.parquet as pq

    from pipeline import output
    from pipeline.stage import plan_stage
    from prophet.models import save_model
    from tests.test_pipeline_ray import job, write_jsonl

    model_dir = save_model(tiny_llada2(seed=3), char_tokenizer(), tmp_path / "tiny-llada2")
    src = write_jsonl(tmp_path / "in.jsonl", task_rows[:6])
    cfg = job(tmp_path, model_dir, src, **{"decoding.rule": "prophet", "decoding.region": "block",
                                           "decoding.thresholds": [0.5, 0.3, 0.1], "decoding.batch_size": 4})
    assert plan_stage(cfg).decode["host"] == "block"
    s = run_job(cfg)
    rows = pq.read_table(output.part_files(cfg.output.dir)).to_pylist()
    assert (s.rows, s.ok) == (6, 6) and all(r["status"] == "ok" for r in rows)
    model = load_block(model_dir)  # the same decode in this process: the same per-row steps and positions
    want = decode(model, [model.encode(r["prompt"]) for r in rows],
                  DecodeConfig(**{**plan_stage(cfg).decode, "thresholds": (0.5, 0.3, 0.1), "anchor_ids": ()}))
    assert [r["steps_used"] for r in rows] == want.steps_used.tolist()
    assert [r["forward_tokens"] for r in rows] == want.forward_tokens.tolist()
    assert [r["completion_ids"][:r["generated_tokens"]] for r in rows] == \
        [t[:n] for t, n in zip(want.tokens.tolist(), want.num_generated.tolist())]


def run_job(cfg):
    from pipeline.run import run
    return run(cfg, log=lambda _: None)


def load_block(path):
    from prophet.models import load_model
    return load_model(path)


def test_lm_eval_decodes_a_block_model_in_whole_blocks():
    pytest.importorskip("lm_eval", reason="lm-eval is the optional extra 'lmeval'")
    from lm_eval.api.instance import Instance

    from prophet.lmeval import ProphetLM, build_config

    assert build_config({}, "block", None, 10, block_length=4).gen_length == 12  # rounded up to whole blocks
    assert build_config({}, "llada", None, 10, block_length=None).gen_length == 10
    model = confident_llada2(4)
    lm = ProphetLM(model=model, rule="prophet", region="block", thresholds="2/1.5/1")
    prompts = ("what is 12+30?", "hi", "abcdefg")
    reqs = [Instance("generate_until", {}, (p, {"until": [], "max_gen_toks": 10}), i, ("t", i, 1))
            for i, p in enumerate(prompts)]
    texts = lm.generate_until(reqs)
    cfg = lm.config_for(10)
    assert cfg.host == "block" and cfg.gen_length == 12
    want = decode(model, [model.encode(p) for p in prompts], cfg, seeds=[lm.seed + i for i in range(3)])
    for text, toks, n in zip(texts, want.tokens.tolist(), want.num_generated.tolist()):
        assert text == model.decode(toks[:min(n, 10)])
    stats = lm.summary()["t"]
    assert stats["mean_forward_tokens"] > 0
    # the greedy check of loglikelihood decodes whole blocks and compares the target's positions
    target = want.tokens[1, :5].tolist()
    assert lm._greedy(model.encode("hi"), target)


def test_a_block_decode_reads_the_host_once_per_step(monkeypatch):
    # issue 10's budget: one read per step (the rows' [finished, phase]) plus one per compaction
    import importlib

    from prophet.hosts.block import BlockBatch
    from tests.test_host_reads import HostReads

    decode_mod = importlib.import_module("prophet.decode")  # the module (prophet.decode is also the function)
    model = confident_llada2(4, dtype=torch.float32)  # float64 experts run one by one (a read per layer)
    steps, keeps = [], []
    real_step, real_keep = decode_mod._step, BlockBatch.keep
    monkeypatch.setattr(decode_mod, "_step", lambda m, b: steps.append(1) or real_step(m, b))
    monkeypatch.setattr(BlockBatch, "keep", lambda self, idx: keeps.append(1) or real_keep(self, idx))
    prompts = [model.encode(s) for s in ("what is 12+30?", "hi", "abcdefg", "x", "0123")]
    cfg = DecodeConfig(host="block", gen_length=12, steps=12, batch_size=2, rule="prophet", region="window",
                       lookahead=1, thresholds=(2.0, 1.5, 1.0), editing_threshold=0.5, max_post_steps=2,
                       temperature=0.5)
    with HostReads() as reads:
        decode(model, prompts, cfg)
    assert len(steps) >= 8
    assert len(reads.calls) <= len(steps) + len(keeps), sorted(set(reads.calls))


def test_the_job_refuses_block_settings_the_model_cannot_run_before_any_work(tmp_path, tiny_model_dir, task_rows):
    from pipeline.config import JobConfigError
    from pipeline.stage import plan_stage
    from prophet.models import save_model
    from tests.test_pipeline_ray import job, write_jsonl

    src = write_jsonl(tmp_path / "in.jsonl", task_rows[:2])
    model_dir = save_model(tiny_llada2(seed=3), char_tokenizer(), tmp_path / "tiny-llada2")
    with pytest.raises(JobConfigError, match="decoding.block_length"):
        plan_stage(job(tmp_path, model_dir, src, **{"decoding.block_length": 8}))
    with pytest.raises(JobConfigError, match="bidirectional"):
        plan_stage(job(tmp_path, tiny_model_dir, src, **{"decoding.host": "block"}))
    assert plan_stage(job(tmp_path, model_dir, src, **{"decoding.block_length": 4})).decode["host"] == "block"
