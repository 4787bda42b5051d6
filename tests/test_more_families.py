"""SDAR (dense and MoE), Fast-dLLM v2 and LLaDA-MoE (issue 21): published names and shapes, config
reading, the shared softmax router, save/load, padding, the published layouts with their chat
templates, and decoding on each family's host equal to the oracle."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from prophet import ConfigError, DecodeConfig, decode, decode_reference
from prophet.models import (CHAR_TOKEN_IDS, ModelLoadError, NativeAdapter, Tokenizer, char_tokenizer, load_model,
                            save_model)
from prophet.models.dream import DreamModel, FastDLLMConfig
from prophet.models.llada_moe import LLaDAMoEConfig, LLaDAMoEModel
from prophet.models.loading import NATIVE_FAMILIES, SAFE_INDEX, check_model_dir, native_family
from prophet.models.moe import Router, RouterSpec, SparseMoE
from prophet.models.sdar import SDARConfig, SDARModel, SDARMoeConfig
from tests.test_llada2 import rename_shards
from tests.test_models import batch

from tiny_support import one_thread  # noqa: E402,F401 (an autouse fixture: one intra-op thread)

FAMILIES = ("sdar", "sdar_moe", "fast_dllm", "llada_moe")
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             rope_theta=10000.0)


def tiny(family: str, seed: int = 0, vocab: int | None = None, **overrides) -> torch.nn.Module:
    """A 2-layer, width-32 model of a family with the character tokenizer's ids (block 4 where blocky)."""
    torch.manual_seed(seed)
    kw = dict(SMALL, vocab_size=vocab or char_tokenizer().vocab_size, **CHAR_TOKEN_IDS)
    if family in ("sdar", "sdar_moe"):
        kw.update(head_dim=8, intermediate_size=64, block_size=4)
        if family == "sdar_moe":
            kw.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, mlp_only_layers=[0])
        cls = SDARMoeConfig if family == "sdar_moe" else SDARConfig
        return SDARModel(cls(**{**kw, **overrides})).eval()
    if family == "fast_dllm":
        return DreamModel(FastDLLMConfig(**{**kw, "intermediate_size": 64, "bd_size": 4, **overrides})).eval()
    kw.update(num_key_value_heads=4, num_experts=8, num_experts_per_tok=3, expert_intermediate_size=16)
    return LLaDAMoEModel(LLaDAMoEConfig(**{**kw, **overrides})).eval()


# ---------------------------------------------------------------- names, shapes, config


def test_state_dict_names_are_the_published_ones():
    attn = {f"self_attn.{p}_proj.weight" for p in "qkvo"} | {"input_layernorm.weight", "post_attention_layernorm.weight"}
    dense = {f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    moe = {"mlp.gate.weight"} | {f"mlp.experts.{j}.{p}_proj.weight" for j in range(8) for p in ("gate", "up", "down")}
    qk = {"self_attn.q_norm.weight", "self_attn.k_norm.weight"}
    bias = {f"self_attn.{p}_proj.bias" for p in "qkv"}
    top = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}

    def names(per_layer: list[set[str]]) -> set[str]:
        return top | {f"model.layers.{i}.{n}" for i, ns in enumerate(per_layer) for n in ns}

    assert set(tiny("sdar").state_dict()) == names([attn | qk | dense] * 2)
    assert set(tiny("sdar_moe").state_dict()) == names([attn | qk | dense, attn | qk | moe])  # layer 0 mlp-only
    assert set(tiny("fast_dllm").state_dict()) == names([attn | bias | dense] * 2)
    assert set(tiny("llada_moe").state_dict()) == names([attn | qk | moe] * 2)  # no expert_bias, no shared expert


def test_flagship_shapes_from_the_family_defaults():
    with torch.device("meta"):
        sdar, fast, lmoe = SDARModel(SDARConfig()), DreamModel(FastDLLMConfig()), LLaDAMoEModel(LLaDAMoEConfig())
    s = {k: tuple(v.shape) for k, v in sdar.state_dict().items()}
    assert s["model.layers.35.self_attn.q_proj.weight"] == (4096, 4096)
    assert s["model.layers.0.self_attn.k_proj.weight"] == (1024, 4096) and s["model.layers.0.self_attn.q_norm.weight"] == (128,)
    assert s["model.layers.0.mlp.gate_proj.weight"] == (12288, 4096) and s["lm_head.weight"] == (151936, 4096)
    assert sdar.block_length == 4 and sdar.config.mask_token_id == 151669
    smoe = SDARMoeConfig()  # 48 layers of 128 experts: built in seconds, so only the config is checked
    assert (smoe.num_hidden_layers, smoe.num_experts, smoe.moe_intermediate_size, smoe.is_moe(0)) == (48, 128, 768, True)
    f = {k: tuple(v.shape) for k, v in fast.state_dict().items()}
    assert f["model.layers.27.self_attn.k_proj.bias"] == (512,) and f["lm_head.weight"] == (152064, 3584)
    assert fast.block_length == 32 and (fast.config.mask_token_id, fast.config.eos_token_id) == (151665, 151645)
    m = {k: tuple(v.shape) for k, v in lmoe.state_dict().items()}
    assert m["model.layers.15.mlp.gate.weight"] == (64, 2048) and m["model.layers.0.self_attn.v_proj.weight"] == (2048, 2048)
    assert m["model.layers.0.mlp.experts.63.up_proj.weight"] == (1024, 2048) and lmoe.block_length is None
    assert (lmoe.config.mask_token_id, lmoe.config.eos_token_id) == (156895, 156892)


# SDAR-1.7B-Chat's config.json (the vendor's keys, trimmed of training switches)
SDAR_JSON = {"architectures": ["SDARForCausalLM"], "model_type": "sdar", "attention_bias": False, "block_size": 4,
             "bos_token_id": 151643, "eos_token_id": 151643, "mask_token_id": 151669, "head_dim": 128,
             "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 6144, "max_position_embeddings": 32768,
             "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
             "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False,
             "use_sliding_window": False, "vocab_size": 151936, "attn_implementation": "flex_attention"}


def test_published_configs_dispatch_by_architecture_and_read_the_vendor_keys():
    assert native_family(SDAR_JSON)[0] is SDARConfig
    c = SDARConfig.from_dict({**SDAR_JSON, "block_size": 16})
    assert (c.hidden_size, c.num_key_value_heads, c.attention_block, c.mask_token_id) == (2048, 8, 16, 151669)
    assert native_family({"architectures": ["SDARMoeForCausalLM"], "model_type": "sdar_moe"})[0] is SDARMoeConfig
    fast = {"architectures": ["Fast_dLLM_QwenForCausalLM"], "model_type": "Fast_dLLM_Qwen", "bd_size": 32,
            "hidden_size": 3584, "num_attention_heads": 28, "num_key_value_heads": 4, "eos_token_id": 151645}
    assert native_family(fast)[0] is FastDLLMConfig
    assert FastDLLMConfig.from_dict(fast).rope_theta == 10000.0  # Qwen2Config's default when absent
    lmoe = {"architectures": ["LLaDAMoEModelLM"], "model_type": "llada", "qk_layernorm": True, "moe_layer_freq": [1] * 16,
            "routed_scaling_factor": 1, "shared_expert_intermediate_size": None, "num_experts": 64}
    assert native_family(lmoe)[0] is LLaDAMoEConfig
    assert native_family({"architectures": ["LLaDAModelLM"], "model_type": "llada"})[0].family == "llada"
    assert native_family({"model_type": "llada"})[0].family == "llada"  # no architectures: dense LLaDA's type


@pytest.mark.parametrize("cls, raw, named", [
    (SDARConfig, {"attention_bias": True}, "attention_bias"),
    (SDARConfig, {"block_size": 0}, "block_size"),
    (SDARConfig, {"num_experts": 4}, "moe_intermediate_size"),
    (FastDLLMConfig, {"use_sliding_window": True}, "use_sliding_window"),
    (LLaDAMoEConfig, {"moe_layer_freq": [1, 0]}, "moe_layer_freq"),
    (LLaDAMoEConfig, {"routed_scaling_factor": 2.5}, "routed_scaling_factor"),
    (LLaDAMoEConfig, {"shared_expert_intermediate_size": 512}, "shared_expert_intermediate_size"),
])
def test_unsupported_features_are_refused_by_name(cls, raw, named):
    with pytest.raises(ModelLoadError, match=named):
        cls.from_dict(raw)


def test_adding_a_family_is_one_registry_line_per_config_class():
    assert [c.family for c, _ in NATIVE_FAMILIES] == ["llada", "dream", "llada2", "sdar", "sdar", "dream",
                                                      "llada_moe"]
    assert {c.model_type for c, _ in NATIVE_FAMILIES} >= {"sdar", "sdar_moe", "Fast_dLLM_Qwen"}


# ---------------------------------------------------------------- the softmax router


def test_softmax_router_weights_are_the_softmax_of_the_chosen_and_renormalise_only_when_asked():
    torch.manual_seed(0)
    x = torch.randn(5, 16)
    plain = Router(16, RouterSpec(8, 3, norm_topk_prob=False, score="softmax", expert_bias=False))
    probs = (x @ plain.weight.T).softmax(-1)
    idx, w = plain(x)
    assert torch.equal(idx, probs.topk(3).indices)
    assert torch.allclose(w, probs.topk(3).values) and (w.sum(-1) < 1).all()  # OLMoE / LLaDA-MoE
    assert "expert_bias" not in plain.state_dict()
    normed = Router(16, RouterSpec(8, 3, norm_topk_prob=True, score="softmax", expert_bias=False))
    normed.load_state_dict(plain.state_dict())
    idx2, w2 = normed(x)
    assert torch.equal(idx2, idx) and torch.allclose(w2, w / w.sum(-1, keepdim=True))  # Qwen3-MoE / SDAR-MoE


def test_moe_layer_with_the_softmax_router_equals_the_per_token_reference():
    torch.manual_seed(1)
    moe = SparseMoE(16, 8, RouterSpec(6, 2, norm_topk_prob=False, score="softmax", expert_bias=False)).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        got = moe(x)
        flat = x.reshape(-1, 16)
        idx, w = moe.gate(flat)
        want = torch.stack([sum(w[n, j] * moe.experts[int(idx[n, j])](flat[n]) for j in range(2)) for n in range(10)])
    assert torch.allclose(got.reshape(-1, 16), want, atol=1e-5)


# ---------------------------------------------------------------- padding, attention, save and load


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_row_equals_the_row_unpadded(family):
    # raw logits: the adapter's shift (Fast-dLLM v2) gives a row's first position a pad's logit, never scored
    module = tiny(family)
    ids, mask = batch(["a longer prompt 12", "short 3"])
    padded = module(ids, mask)
    n = int(mask[1].sum())
    assert torch.allclose(padded[1, -n:], module(ids[1:, -n:])[0], atol=1e-5)
    assert torch.allclose(padded[0], module(ids[:1])[0], atol=1e-5)


@pytest.mark.parametrize("family, blocky", [("sdar", True), ("fast_dllm", True), ("llada_moe", False)])
def test_attention_is_block_causal_for_the_block_families_only(family, blocky):
    module = tiny(family)
    ids = torch.tensor([char_tokenizer().encode("0123456789ab")])
    later = ids.clone()
    later[0, 10] = CHAR_TOKEN_IDS["mask_token_id"]  # block 2 (of 4)
    base, out = module(ids), module(later)
    assert torch.allclose(out[0, :8], base[0, :8], atol=1e-6) == blocky
    assert not torch.allclose(out[0, 8:10], base[0, 8:10], atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip_gives_identical_logits(tmp_path, family):
    module = tiny(family)
    path = save_model(module, char_tokenizer(), tmp_path / family, max_shard_bytes=40_000)
    assert (path / SAFE_INDEX).is_file()
    check_model_dir(path)
    model = load_model(path)
    ids, mask = batch(["a prompt", "b"])
    assert torch.equal(model.logits(ids, mask), NativeAdapter(module, char_tokenizer()).logits(ids, mask))
    assert model.default_host == ("llada" if family == "llada_moe" else "block")
    assert model.block_length == (None if family == "llada_moe" else 4)
    assert model.query_lead == (family == "fast_dllm")
    if family != "llada_moe":  # a checkpoint trained with another block: the loader's override reaches attention
        other = load_model(path, block_length=2)
        assert other.block_length == 2 and not torch.equal(other.logits(ids, mask), model.logits(ids, mask))
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == list(type(module.config).architectures)


@pytest.mark.parametrize("family", ["sdar", "fast_dllm"])
def test_a_tied_head_is_the_embedding_and_round_trips(tmp_path, family):
    module = tiny(family, tie_word_embeddings=True)
    assert "lm_head.weight" not in module.state_dict()
    path = save_model(module, char_tokenizer(), tmp_path / "tied")
    ids, mask = batch(["tied", "head"])
    assert torch.equal(load_model(path).logits(ids, mask), NativeAdapter(module, char_tokenizer()).logits(ids, mask))


QWEN_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def published_dir(tmp_path: Path, family: str, template_file: bool) -> Path:
    """A tiny model in the vendor's layout: renamed shards with an index, tokenizer.json with the Qwen chat
    tokens and the mask, the chat template in chat_template.jinja or tokenizer_config.json, config.json
    without the generation defaults (mask id) where the vendor leaves them out."""
    from tokenizers import Tokenizer as HFTok, models, pre_tokenizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
    vocab = {c: i for i, c in enumerate(sorted(set("abcdefghijklmnopqrstuvwxyz \n?")))}
    inner = HFTok(models.WordLevel(vocab, unk_token="a"))
    inner.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    inner.add_special_tokens(specials)
    tok = Tokenizer(inner, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
                    None if template_file else QWEN_TEMPLATE)
    ids = {t: tok.token_to_id(t) for t in specials}
    module = tiny(family, vocab=tok.vocab_size, pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                  mask_token_id=ids["<|mask|>"], eot_token_id=ids["<|im_end|>"], bos_token_id=None)
    path = save_model(module, tok, tmp_path / family, max_shard_bytes=30_000)
    if template_file:
        (path / "chat_template.jinja").write_text(QWEN_TEMPLATE)
    rename_shards(path)
    return path


@pytest.mark.parametrize("family, template_file", [("sdar", True), ("fast_dllm", False), ("llada_moe", False),
                                                   ("sdar_moe", True)])
def test_the_published_layout_loads_with_its_template(tmp_path, family, template_file):
    path = published_dir(tmp_path, family, template_file)
    check_model_dir(path)
    model = load_model(path)
    assert model.mask_id == model.tokenizer.token_to_id("<|mask|>") and model.family == tiny(family).config.family
    text = model.render_chat([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert model.encode("<|im_end|>") == [model.eot_id]
    assert torch.isfinite(model.logits(torch.tensor([model.encode(text)]), None)).all()


# ---------------------------------------------------------------- decoding on each family's host


@lru_cache(maxsize=None)
def confident(family: str) -> NativeAdapter:
    """A tiny model in float64 (cache and recomputation agree far below any ranking gap), its head scaled
    so that probabilities and gaps span the rules' thresholds."""
    module = tiny(family, seed=3).to(torch.float64)
    with torch.no_grad():
        module.lm_head.weight.mul_(40)
    return NativeAdapter(module, char_tokenizer())


PROMPTS = ("what is 12+30?", "hi", "abcdefg", "x", "0123")


@pytest.mark.parametrize("family", ["sdar", "sdar_moe", "fast_dllm"])
@pytest.mark.parametrize("kw", [dict(), dict(rule="confidence_threshold", confidence=0.6),
                                dict(rule="prophet", region="window", lookahead=1, thresholds=(2.0, 1.5, 1.0)),
                                dict(rule="full", temperature=0.7),
                                dict(rule="confidence_threshold", confidence=0.6, sub_block=2)],
                         ids=["full", "threshold", "prophet-lookahead", "sampled", "sub-blocks"])
def test_block_families_decode_on_the_block_host_equal_to_the_oracle(family, kw):
    # Fast-dLLM v2's shift on the block host: each pass also runs the position before the block
    model = confident(family)
    prompts = [model.encode(s) for s in PROMPTS]
    cfg = DecodeConfig(host=model.default_host, gen_length=12, steps=12, batch_size=3, **kw)
    got, want = decode(model, prompts, cfg, seeds=list(range(5))), decode_reference(model, prompts, cfg, seeds=list(range(5)))
    for f in ("tokens", "committed_early", "nonfinite", "num_generated"):  # steps: the oracle has no cache passes
        assert torch.equal(getattr(got, f), getattr(want, f)), f
    assert (got.tokens != model.mask_id).all()


def test_fast_dllm_block_pass_scores_the_blocks_first_position_from_the_one_before():
    # the cached block pass of a shifted family equals the shifted logits of the whole row
    model = confident("fast_dllm")
    row = torch.tensor([char_tokenizer().encode("abcdefghij") + [model.mask_id] * 6])  # 16 = 4 blocks
    model.setup_cache(1, 16)
    slot = torch.tensor([0])
    model.block_logits(row[:, :8], torch.arange(8)[None], slot, torch.tensor([8]), scored=False)
    got = model.block_logits(row[:, 7:12], torch.arange(7, 12)[None], slot, torch.tensor([12]))
    model.drop_cache()
    assert got.shape[1] == 4 and torch.allclose(got[0], model.logits(row, None)[0, 8:12], atol=1e-9)


@pytest.mark.parametrize("kw", [dict(), dict(cache="prefix", block_length=4, rule="prophet", statistic="min"),
                                dict(cache="dual", block_length=4, rule="confidence_threshold")],
                         ids=["no-cache", "prefix-prophet", "dual-threshold"])
def test_llada_moe_decodes_on_the_llada_host_equal_to_the_oracle(kw):
    model = confident("llada_moe")
    prompts = [model.encode(s) for s in PROMPTS]
    cfg = DecodeConfig(gen_length=12, steps=12, batch_size=3, **kw)
    got, want = decode(model, prompts, cfg), decode_reference(model, prompts, cfg)
    for f in ("tokens", "committed_early", "num_generated", "forward_tokens"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f


@pytest.mark.ray
@pytest.mark.slow
def test_the_job_decodes_a_shifted_block_family_with_its_checkpoint_block(ray_local, tmp_path, task_rows):
    # the job, stage and decode paths are generic over families: a tiny Fast-dLLM v2 (shifted logits,
    # attention block from config.json's bd_size) decodes on the block host with the per-row steps and
    # tokens of the same decode in this process; a block_length other than bd_size is refused up front
    import pyarrow.parquet as pq

    from pipeline import output
    from pipeline.config import JobConfigError
    from pipeline.run import run
    from pipeline.stage import plan_stage
    from tests.test_pipeline_ray import job, write_jsonl

    model_dir = save_model(tiny("fast_dllm", seed=3, bd_size=8), char_tokenizer(), tmp_path / "tiny-fast-dllm")
    src = write_jsonl(tmp_path / "in.jsonl", task_rows[:4])
    cfg = job(tmp_path, model_dir, src, **{"decoding.rule": "confidence_threshold", "decoding.confidence": 0.9,
                                           "decoding.batch_size": 3})
    decode_cfg = plan_stage(cfg).decode
    assert decode_cfg["host"] == "block"
    s = run(cfg, log=lambda _: None)
    rows = pq.read_table(output.part_files(cfg.output.dir)).to_pylist()
    assert (s.rows, s.ok) == (4, 4)
    model = load_model(model_dir)
    assert model.block_length == 8
    want = decode(model, [model.encode(r["prompt"]) for r in rows],
                  DecodeConfig(**{**decode_cfg, "thresholds": tuple(decode_cfg["thresholds"]), "anchor_ids": ()}))
    assert [r["steps_used"] for r in rows] == want.steps_used.tolist()
    assert [r["completion_ids"][:r["generated_tokens"]] for r in rows] == \
        [t[:n] for t, n in zip(want.tokens.tolist(), want.num_generated.tolist())]
    with pytest.raises(JobConfigError, match="decoding.block_length"):
        plan_stage(job(tmp_path, model_dir, src, **{"decoding.block_length": 4}))


def test_sub_blocks_commit_in_order_as_fast_dllm_v2_decodes():
    # Fast-dLLM v2's decoder: inside a block only the first sub-block still holding masks takes commits,
    # each pass the ones above the threshold, else the most confident (quota 1: steps = gen_length)
    model = confident("fast_dllm")  # blocks of 4
    prompts = [model.encode(s) for s in PROMPTS]
    base = dict(host="block", gen_length=12, steps=12, batch_size=3, rule="confidence_threshold", confidence=0.9)
    whole, subs = decode(model, prompts, DecodeConfig(**base)), decode(model, prompts, DecodeConfig(**base, sub_block=2))
    assert torch.equal(subs.tokens, decode_reference(model, prompts, DecodeConfig(**base, sub_block=2)).tokens)
    assert not torch.equal(whole.tokens, subs.tokens)  # the order of commits changes what the model sees
    with pytest.raises(ConfigError, match="sub_block"):
        decode(model, prompts, DecodeConfig(**base, sub_block=3))  # does not divide the block of 4
    with pytest.raises(ConfigError, match="sub_block"):
        DecodeConfig(host="llada", gen_length=12, steps=12, sub_block=2)
