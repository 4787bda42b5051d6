"""The batched decoder equals the one-row oracle on the real tiny trained models (fp32).

Prompts of the tasks have different lengths, so rows are left-padded next to each other.
"""
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from prophet import decode, decode_reference

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("tokens", "steps_used", "committed_early", "commit_step", "nonfinite", "num_generated")


from tiny_support import one_thread  # noqa: E402,F401 (an autouse fixture: one intra-op thread)


def load(name):
    path = ROOT / "checkpoints" / name
    if not (path / "config.json").exists():
        pytest.skip(f"{path} holds no shipped checkpoint (config.json) yet")
    from prophet.models import load_model
    return load_model(path, dtype=torch.float32)


def mixed_prompts(model, n_each=4):
    from prophet.tasks import get_task
    return [model.encode(ex.prompt) for task in ("sudoku4", "running_parity")
            for ex in get_task(task).examples("test", n_each, seed=1)]


@pytest.mark.parametrize("name", ["tiny-llada", "tiny-dream"])
@pytest.mark.parametrize("overrides", [dict(), dict(rule="prophet", statistic="min", region="window"),
                                       dict(rule="gap_parallel", temperature=0.7, cfg_scale=0.5),
                                       dict(cache="prefix", block_length=8, rule="prophet", statistic="min"),
                                       dict(cache="dual", block_length=8, rule="confidence_threshold", cfg_scale=0.5)],
                         ids=["full", "prophet-min", "gap_parallel-sampled-cfg", "prefix-prophet", "dual-threshold-cfg"])
def test_batched_equals_oracle_on_the_tiny_model(name, overrides):
    from prophet.tasks import get_task
    from prophet.tasks.evaluation import task_config

    model = load(name)
    prompts = mixed_prompts(model)
    assert len({len(p) for p in prompts}) > 1
    cfg = replace(task_config(model, get_task("sudoku4")), batch_size=3, **overrides)
    got, want = decode(model, prompts, cfg), decode_reference(model, prompts, cfg)
    for f in FIELDS + ("forward_tokens",):
        assert torch.equal(getattr(got, f), getattr(want, f)), f
    assert torch.allclose(got.commit_gap, want.commit_gap, equal_nan=True)


@pytest.mark.parametrize("name", ["tiny-llada", "tiny-dream"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_a_cache_refreshed_every_step_gives_the_tokens_of_no_cache(name, cache):
    from prophet.tasks import get_task
    from prophet.tasks.evaluation import task_config

    model = load(name)
    prompts = mixed_prompts(model)
    cfg = replace(task_config(model, get_task("sudoku4")), batch_size=3, block_length=8, rule="prophet",
                  statistic="min")
    none = decode(model, prompts, cfg)
    every = decode(model, prompts, replace(cfg, cache=cache, cache_refresh_every=1))
    cached = decode(model, prompts, replace(cfg, cache=cache))
    for f in FIELDS:
        assert torch.equal(getattr(every, f), getattr(none, f)), f
    assert torch.equal(every.forward_tokens, none.forward_tokens)
    assert cached.forward_tokens.sum() < none.forward_tokens.sum()
