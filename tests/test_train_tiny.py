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
    """The family's training loss on the same validation examples and masks, summed over tasks."""
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for name in sorted(TASKS):
            task = get_task(name)
            batch = job.encode_batch(adapter, task, task.examples("valid", 48, seed=seed))
            total += float(job.training_loss(adapter, batch, gen))
    return total


@pytest.mark.parametrize("family", ["llada", "dream", "llada2"])
def test_a_few_steps_save_a_loadable_model_whose_loss_drops(tmp_path, family):
    out = tmp_path / f"tiny-{family}"
    record = train_tiny.main(["--family", family, "--out", str(out), "--steps", "20", "--warmup", "5",
                              "--batch", "16", "--eval-n", "4" if family == "llada2" else "0", "--dtype", "fp32"])
    model = load_model(out)
    assert model.family == family and model.name == f"tiny-{family}"
    assert json.loads((out / "training.json").read_text())["config"]["steps"] == 20
    assert record["parameters"] == sum(p.numel() for p in model.module.parameters())
    if family == "llada2":  # held out through the block host: Full and one step per block, per task
        assert model.block_length == 8 and model.default_host == "block"
        assert all(set(v) == {"n", "full", "one_step_per_block"} for v in record["heldout_accuracy"].values())

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


def test_block_diffusion_loss_sees_each_noisy_block_as_decoding_does():
    # the two-copy pass gives every noisy block the logits of a plain forward over the clean blocks
    # before it followed by that noisy block: what the block decoder computes
    from prophet.models import char_tokenizer
    from prophet.models.layers import position_ids, two_copy_block_inputs

    cfg = train_tiny.TrainConfig(family="llada2", layers=2, block=4)
    tok = char_tokenizer()
    torch.manual_seed(0)
    module = train_tiny.build_module(cfg, tok.vocab_size, 128).eval()
    adapter = train_tiny.NativeAdapter(module, tok)
    task = get_task("running_parity")
    batch = train_tiny.encode_batch(adapter, task, task.examples("train", 3, seed=1), [17, 20, 24])
    noisy = batch.ids.masked_fill(batch.window & (torch.rand(batch.ids.shape) < 0.5), adapter.mask_id)
    L = batch.ids.shape[1]
    inputs = two_copy_block_inputs(batch.attn, module.config.rotary_dim, module.config.rope_theta, 4)
    with torch.no_grad():
        both = module.head(module.hidden(torch.cat([noisy, batch.ids], dim=1), inputs))   # (B, 2L, V)
        assert torch.allclose(both[:, L:], module(batch.ids, batch.attn), atol=1e-5)      # clean copy
        for b in range(3):
            real = batch.attn[b]
            clean, masked = batch.ids[b, real], noisy[b, real]
            pos = position_ids(batch.attn)[b, real]
            for k in range(int(pos[-1]) // 4 + 1):
                seq = torch.cat([clean[:4 * k], masked[4 * k:4 * k + 4]])[None]
                want = module(seq)[0, 4 * k:]
                got = both[b, :L][real][4 * k:4 * k + 4]
                assert torch.allclose(got, want, atol=1e-5), (b, k)


def test_expert_bias_moves_toward_the_under_loaded_experts():
    from prophet.models import char_tokenizer

    cfg = train_tiny.TrainConfig(family="llada2", layers=2)
    torch.manual_seed(0)
    module = train_tiny.build_module(cfg, char_tokenizer().vocab_size, 128).train()
    balance = train_tiny.ExpertLoad(module, rate=0.01)
    router = balance.routers[0]
    with torch.no_grad():
        router.expert_bias[0] = 1.0   # every token picks expert 0: over-loaded
        module(torch.randint(6, 60, (4, 20)))
    load = balance.counts[0].clone()
    balance.step()
    assert load[0] == 80 and router.expert_bias[0] == pytest.approx(0.99)
    idle = load < load.mean()
    assert torch.allclose(router.expert_bias[idle], torch.full((int(idle.sum()),), 0.01))
    balance.close()
    module.eval()
    with torch.no_grad():
        module(torch.randint(6, 60, (2, 5)))
    assert balance.counts[0].sum() == 0   # detached: nothing counted

