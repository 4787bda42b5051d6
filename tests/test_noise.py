"""Counter-based randomness (prophet.noise): a pure function of (seed, step, position, token)."""
import torch

from prophet import DecodeConfig, decode
from prophet.noise import (POSITION_STREAM, TOKEN_STREAM, counter_key, position_uniforms, seed_words, token_uniforms,
                           uniform_reference)
from prophet.scripted import ScriptedDLM
from tests.test_decode import prompts_for


def test_uniforms_equal_the_python_integer_function_bit_for_bit():
    # the same integer arithmetic on any device: the torch version must equal the plain one
    seeds = [0, 1, 2**40 + 7, 2**62 - 1, -5]
    step, positions = torch.tensor([1, 3, 7, 2**33, 12]), torch.tensor([[0, 5, 63]] * 5)
    keys = counter_key(seed_words(seeds, torch.device("cpu")), step, positions, TOKEN_STREAM)
    tok = token_uniforms(keys.reshape(-1), 50).view(5, 3, 50)
    pos = position_uniforms(counter_key(seed_words(seeds, torch.device("cpu")), step, positions, POSITION_STREAM))
    for i, s in enumerate(seeds):
        for j, p in enumerate(positions[i].tolist()):
            assert pos[i, j].item() == uniform_reference(s, step[i].item(), p, POSITION_STREAM)
            for v in (0, 1, 17, 49):
                assert tok[i, j, v].item() == uniform_reference(s, step[i].item(), p, TOKEN_STREAM, v)


def test_uniforms_look_uniform_and_independent():
    keys = counter_key(seed_words(list(range(64)), torch.device("cpu")), torch.arange(64),
                       torch.arange(32)[None].expand(64, 32), TOKEN_STREAM).reshape(-1)
    u = token_uniforms(keys, 64).double().reshape(-1)  # 131,072 draws
    assert ((u > 0) & (u < 1)).all()
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    hist = torch.histc(u, bins=16, min=0, max=1) / u.numel()
    assert (hist - 1 / 16).abs().max() < 0.004
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()) < 0.01  # neighbouring tokens
    assert u.unique().numel() > 0.99 * u.numel()


def test_sampled_tokens_do_not_depend_on_batch_size_slot_order_or_device_state():
    # temperature > 0 at both hosts, random positions too: the same seeds give the same tokens at
    # any batch size and any order of the prompts, and torch's global generator plays no part
    model, prompts, seeds = ScriptedDLM(16), prompts_for(21, 10), [3 * i + 1 for i in range(10)]
    for cfg in (DecodeConfig(gen_length=16, steps=8, block_length=8, temperature=0.9, remasking="random"),
                DecodeConfig(host="dream", gen_length=16, steps=8, temperature=0.8, alg="entropy", alg_temp=0.5)):
        base = decode(model, prompts, DecodeConfig(**{**cfg.to_dict(), "batch_size": 1}), seeds=seeds)
        for bs in (3, 10):
            torch.manual_seed(bs)
            order = torch.randperm(10).tolist()
            got = decode(model, [prompts[i] for i in order], DecodeConfig(**{**cfg.to_dict(), "batch_size": bs}),
                         seeds=[seeds[i] for i in order])
            assert torch.equal(got.tokens, base.tokens[order])
        other = decode(model, prompts, cfg, seeds=[s + 1 for s in seeds])
        assert not torch.equal(other.tokens, base.tokens)
