"""jobs/train_tiny.py: a few real training steps of each family produce a loadable, better model."""
from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_support import load_job, one_thread  # noqa: F401 (one_thread is an autouse fixture)

from prophet.models import load_model
from prophet.tasks import TASKS, get_task

train_tiny = load_job("train_tiny")


def fixed_batch_loss(job, adapter, seed: int = 123) -> float:
    """Masked-diffusion loss on the same validation examples and masks, summed over tasks."""
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for name in sorted(TASKS):
            task = get_task(name)
            batch = job.encode_batch(adapter, task, task.examples("valid", 48, seed=seed))
            total += float(job.diffusion_loss(adapter, batch, gen))
    return total


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_a_few_steps_save_a_loadable_model_whose_loss_drops(tmp_path, family):
    out = tmp_path / f"tiny-{family}"
    record = train_tiny.main(["--family", family, "--out", str(out), "--steps", "20", "--warmup", "5",
                              "--batch", "16", "--eval-n", "0", "--dtype", "fp32"])
    model = load_model(out)
    assert model.family == family and model.name == f"tiny-{family}"
    assert json.loads((out / "training.json").read_text())["config"]["steps"] == 20
    assert record["parameters"] == sum(p.numel() for p in model.module.parameters())

    # the same initial weights as the run (seeded), rebuilt and scored on a fixed batch
    cfg = train_tiny.TrainConfig(family=family)
    torch.manual_seed(cfg.seed)
    fresh = train_tiny.NativeAdapter(train_tiny.build_module(cfg, model.vocab_size, 128), model.tokenizer)
    before, after = fixed_batch_loss(train_tiny, fresh), fixed_batch_loss(train_tiny, model)
    assert math.isfinite(after) and after < 0.8 * before, (before, after)


def test_window_covers_answer_and_eos_padding_and_never_the_prompt():
    from prophet.models import char_tokenizer

    cfg = train_tiny.TrainConfig(family="dream", layers=1)
    tok = char_tokenizer()
    adapter = train_tiny.NativeAdapter(train_tiny.build_module(cfg, tok.vocab_size, 128), tok)
    task = get_task("running_parity")
    examples = task.examples("train", 8, seed=0)
    batch = train_tiny.encode_batch(adapter, task, examples)
    gen_len = task.budget.gen_length
    for i, ex in enumerate(examples):
        row, window = batch.ids[i], batch.window[i]
        assert int(window.sum()) == gen_len
        answer = adapter.decode(row[window].tolist()[:len(ex.answer)])
        assert answer == ex.answer
        assert (row[window][len(ex.answer):] == adapter.eos_id).all()
        assert adapter.decode(row[batch.attn[i] & ~window].tolist()) == ex.prompt
        assert (row[~batch.attn[i]] == adapter.pad_id).all()


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = train_tiny.TrainConfig(steps=1000, warmup=100, lr=2e-3, final_lr_frac=0.05)
    lrs = [train_tiny.lr_at(s, cfg) for s in range(cfg.steps)]
    assert lrs[0] == pytest.approx(2e-5) and lrs[99] == pytest.approx(2e-3)
    assert all(a >= b for a, b in zip(lrs[100:], lrs[101:]))
    assert lrs[-1] == pytest.approx(0.05 * 2e-3, rel=1e-3)
