"""Native LLaDA2 (LLaDA2MoeModelLM): names and shapes, config reading, the MoE layer and router,
partial rotary, block-causal attention, the exact block cache, loading the published layout."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from prophet.models import (CHAR_TOKEN_IDS, LLaDA2Config, LLaDA2Model, ModelLoadError, NativeAdapter, Tokenizer,
                            char_tokenizer, load_model, save_model)
from prophet.models.layers import CacheIndex, apply_rotary, rotary_tables
from prophet.models.loading import SAFE_INDEX, check_model_dir
from prophet.models.moe import RouterSpec, Router, SparseMoE
from tests.test_models import batch, tiny_module

PAD = CHAR_TOKEN_IDS["pad_token_id"]


def tiny_llada2(seed: int = 0, **overrides) -> LLaDA2Model:
    """3 layers (one dense), 8 experts in 2 groups, top-2, a shared expert, block 4, char tokenizer ids."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=char_tokenizer().vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
              n_group=2, topk_group=1, moe_intermediate_size=16, num_shared_experts=1, first_k_dense_replace=1,
              max_position_embeddings=256, rope_theta=10000.0, block_length=4, **CHAR_TOKEN_IDS)
    module = LLaDA2Model(LLaDA2Config(**{**kw, **overrides}))
    with torch.no_grad():  # a trained router has a non-zero bias; make the tests see one
        for moe in (m for m in module.modules() if isinstance(m, SparseMoE)):
            moe.gate.expert_bias.normal_(std=0.05)
    return module.eval()


# ---------------------------------------------------------------- names, shapes, config


def test_state_dict_names_are_the_published_ones():
    names = set(tiny_llada2().state_dict())
    attn = ("attention.query_key_value", "attention.query_layernorm", "attention.key_layernorm", "attention.dense",
            "input_layernorm", "post_attention_layernorm")
    want = {"model.word_embeddings.weight", "model.norm.weight", "lm_head.weight"}
    want |= {f"model.layers.{i}.{p}.weight" for i in range(3) for p in attn}
    want |= {f"model.layers.0.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
    for i in (1, 2):
        want |= {f"model.layers.{i}.mlp.gate.weight", f"model.layers.{i}.mlp.gate.expert_bias"}
        want |= {f"model.layers.{i}.mlp.{e}.{p}.weight" for e in [f"experts.{j}" for j in range(8)] + ["shared_experts"]
                 for p in ("gate_proj", "up_proj", "down_proj")}
    assert names == want


def test_mini_shapes_from_the_family_defaults():
    with torch.device("meta"):
        m = LLaDA2Model(LLaDA2Config())
    s = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert s["model.layers.0.attention.query_key_value.weight"] == ((16 + 2 * 4) * 128, 2048)
    assert s["model.layers.0.attention.query_layernorm.weight"] == (128,)
    assert s["model.layers.0.mlp.gate_proj.weight"] == (5120, 2048)
    assert s["model.layers.1.mlp.gate.weight"] == (256, 2048) and s["model.layers.1.mlp.gate.expert_bias"] == (256,)
    assert s["model.layers.19.mlp.experts.255.down_proj.weight"] == (2048, 512)
    assert s["model.layers.1.mlp.shared_experts.up_proj.weight"] == (512, 2048)
    assert s["lm_head.weight"] == (157184, 2048) and m.config.rotary_dim == 64 and m.block_length == 32
    assert (m.config.mask_token_id, m.config.eos_token_id, m.config.pad_token_id) == (156895, 156892, 156892)


MINI_JSON = {"architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "first_k_dense_replace": 1,
             "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 5120,
             "max_position_embeddings": 32768, "moe_intermediate_size": 512, "moe_router_enable_expert_bias": True,
             "n_group": 8, "norm_topk_prob": True, "num_attention_heads": 16, "num_experts": 256,
             "num_experts_per_tok": 8, "num_hidden_layers": 20, "num_key_value_heads": 4, "num_shared_experts": 1,
             "pad_token_id": 156892, "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-06, "rope_theta": 600000,
             "routed_scaling_factor": 2.5, "score_function": "sigmoid", "tie_word_embeddings": False,
             "topk_group": 4, "use_bias": False, "use_qkv_bias": False, "use_qk_norm": True, "vocab_size": 157184}


def test_published_config_reads_and_absent_keys_mean_the_reference_class_defaults():
    c = LLaDA2Config.from_dict(MINI_JSON)
    assert (c.hidden_size, c.num_experts, c.first_k_dense_replace, c.rotary_dim) == (2048, 256, 1, 64)
    assert c.mask_token_id == 156895  # not in config.json: the family's generation default
    assert LLaDA2Config.from_dict({**MINI_JSON, "mask_token_id": 7}).mask_token_id == 7
    bare_raw = {"model_type": "llada2_moe", "use_bias": False, "num_key_value_heads": 4,
                "intermediate_size": 64, "moe_intermediate_size": 32}
    # the class's default vocabulary (30592) cannot hold the family's mask id: refused, naming the key
    with pytest.raises(ModelLoadError, match="mask_token_id"):
        LLaDA2Config.from_dict(bare_raw)
    bare = LLaDA2Config.from_dict({**bare_raw, "vocab_size": 157184})
    # LLaDA2MoeConfig's own defaults, not mini's
    assert (bare.hidden_size, bare.num_experts, bare.num_experts_per_tok, bare.first_k_dense_replace) == (1024, 16, 2, 0)
    assert (bare.rope_theta, bare.rms_norm_eps, bare.num_shared_experts, bare.shared_width) == (10000.0, 1e-5, 0, 0)


@pytest.mark.parametrize("key, value, named", [("use_qkv_bias", True, "use_qkv_bias"),
                                               ("score_function", "softmax", "score_function"),
                                               ("rope_scaling", {"type": "linear"}, "rope_scaling")])
def test_unsupported_feature_is_refused_by_name(key, value, named):
    with pytest.raises(ModelLoadError, match=named):
        LLaDA2Config.from_dict({**MINI_JSON, key: value})


def test_absent_use_bias_is_refused_since_the_reference_default_has_biases():
    raw = {k: v for k, v in MINI_JSON.items() if k != "use_bias"}
    with pytest.raises(ModelLoadError, match="use_bias"):
        LLaDA2Config.from_dict(raw)


@pytest.mark.parametrize("extra", [{"delete_token_id": 9, "split_token_id": 10},
                                   {"_name_or_path": "inclusionAI/LLaDA2.2-flash"}])
def test_a_llada22_config_is_refused_by_name(extra):
    with pytest.raises(ModelLoadError, match="LLaDA2.2"):
        LLaDA2Config.from_dict({**MINI_JSON, **extra})


def test_missing_widths_are_named_and_no_experts_means_every_layer_dense():
    with pytest.raises(ModelLoadError, match="moe_intermediate_size"):
        LLaDA2Config.from_dict({**MINI_JSON, "moe_intermediate_size": None, "num_experts": 8, "n_group": 1,
                                "topk_group": 1})
    dense = tiny_llada2(num_experts=None)
    assert not any(".experts." in k or ".gate.weight" in k for k in dense.state_dict())


# ---------------------------------------------------------------- router and MoE layer


def reference_moe(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE layer written per token, as SPEC section 8 states it: (N, C) -> (N, C)."""
    s = moe.gate.spec
    per_group = s.n_experts // s.n_group
    out = []
    for tok in x:
        scores = torch.sigmoid(moe.gate.weight.float() @ tok.float())
        biased = (scores + moe.gate.expert_bias).tolist()
        group_score = [sum(sorted(biased[g * per_group:(g + 1) * per_group])[-2:]) for g in range(s.n_group)]
        groups = sorted(range(s.n_group), key=lambda g: -group_score[g])[:s.topk_group]
        allowed = [e for g in groups for e in range(g * per_group, (g + 1) * per_group)]
        chosen = sorted(allowed, key=lambda e: -biased[e])[:s.top_k]
        # renormalised to sum 1 (the vendor's code skips it for a single expert)
        total = sum(scores[e] for e in chosen) if s.norm_topk_prob and s.top_k > 1 else 1.0
        y = moe.shared_experts(tok) if moe.shared_experts is not None else torch.zeros_like(tok)
        for e in chosen:
            y = y + (scores[e] / total * s.scaling) * moe.experts[e](tok)
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("grad", [False, True])
def test_moe_layer_equals_the_per_token_reference(grad):
    torch.manual_seed(0)
    moe = SparseMoE(32, 16, RouterSpec(8, 2, n_group=4, topk_group=2, scaling=2.5), shared_inner=16)
    with torch.no_grad():
        moe.gate.expert_bias.normal_(std=0.1)
    x = torch.randn(3, 7, 32)
    with torch.set_grad_enabled(grad):  # no grad: torch's grouped matmul; grad: the loop over active experts
        got = moe(x)
    want = reference_moe(moe, x.view(-1, 32)).view(3, 7, 32)
    assert torch.allclose(got, want, atol=1e-5)


def test_moe_grouped_and_looped_paths_agree_with_idle_experts():
    torch.manual_seed(1)
    moe = SparseMoE(16, 8, RouterSpec(8, 1, n_group=1, topk_group=1))
    x = torch.randn(1, 3, 16)  # 3 tokens, top-1: at least 5 of 8 experts get nothing
    with torch.no_grad():
        fast = moe(x)
    assert torch.allclose(fast, moe(x), atol=1e-6)
    assert torch.allclose(fast, reference_moe(moe, x[0])[None], atol=1e-6)


def test_router_selects_with_expert_bias_but_weights_by_the_unbiased_scores():
    torch.manual_seed(2)
    router = Router(16, RouterSpec(8, 2, n_group=1, topk_group=1, scaling=2.5))
    x = torch.randn(20, 16)
    with torch.no_grad():
        router.expert_bias[5] = 10.0  # far above any sigmoid gap: expert 5 is always chosen
        idx, w = router(x)
    scores = torch.sigmoid(x @ router.weight.T)
    assert (idx == 5).any(-1).all()
    want = scores.gather(1, idx) / scores.gather(1, idx).sum(-1, keepdim=True) * 2.5
    assert torch.allclose(w, want, atol=1e-6)  # the bias of 10 appears nowhere in the weights
    assert torch.allclose(w.sum(-1), torch.full((20,), 2.5))


def test_router_keeps_its_experts_inside_the_best_groups():
    torch.manual_seed(3)
    router = Router(16, RouterSpec(16, 3, n_group=4, topk_group=1))
    with torch.no_grad():
        idx, _ = router(torch.randn(50, 16))
    assert (idx // 4 == idx[:, :1] // 4).all()  # one group of 4 per token
    with torch.no_grad():  # a group whose two best are biased up wins every token
        router.expert_bias[[9, 10]] = 5.0
        idx, _ = router(torch.randn(50, 16))
    assert (idx // 4 == 2).all()


def test_packing_the_experts_keeps_names_and_memory():
    moe = SparseMoE(16, 16, RouterSpec(4, 2, n_group=2, topk_group=1))
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    gate, _, _ = moe.packed()
    after = moe.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert moe.experts[3].gate_proj.weight.data_ptr() == gate[3].data_ptr()  # a view, not a copy


# ---------------------------------------------------------------- rotary, attention, cache


def test_partial_rotary_turns_the_first_dims_and_passes_the_rest():
    x = torch.randn(2, 3, 5, 16)
    cos, sin = rotary_tables(torch.arange(5).expand(2, 5) + 3, 8, 10000.0)
    y = apply_rotary(x, cos, sin)
    assert torch.equal(y[..., 8:], x[..., 8:])
    assert torch.allclose(y[..., :8], apply_rotary(x[..., :8], cos, sin))
    assert not torch.allclose(y[..., :8], x[..., :8])


def test_left_padded_row_equals_the_row_unpadded():
    model = tiny_llada2()
    ids, mask = batch(["a longer prompt 12", "short 3"])
    padded = model(ids, mask)
    n = int(mask[1].sum())
    alone = model(ids[1:, -n:])
    assert torch.allclose(padded[1, -n:], alone[0], atol=1e-5)
    assert torch.allclose(padded[0], model(ids[:1])[0], atol=1e-5)


def test_attention_is_block_causal_from_each_rows_own_position_zero():
    model = tiny_llada2()  # block 4
    ids, mask = batch(["0123456789ab", "xyz456789"])
    base = model(ids, mask)
    later = ids.clone()
    later[:, -2] = CHAR_TOKEN_IDS["mask_token_id"]  # position 10 of row 0 (block 2), 7 of row 1 (block 1)
    out = model(later, mask)
    pad1 = int((~mask[1]).sum())
    assert torch.allclose(out[0, :8], base[0, :8], atol=1e-6)               # blocks 0-1 of row 0 unchanged
    assert not torch.allclose(out[0, 8:10], base[0, 8:10], atol=1e-4)      # its own block sees it
    assert torch.allclose(out[1, pad1:pad1 + 4], base[1, pad1:pad1 + 4], atol=1e-6)  # row 1 block 0
    assert not torch.allclose(out[1, pad1 + 4:pad1 + 7], base[1, pad1 + 4:pad1 + 7], atol=1e-4)


def test_bidirectional_families_keep_their_mask_and_a_block_length_of_none():
    from prophet.models.layers import attention_inputs

    ids, mask = batch(["same", "sz"])
    assert attention_inputs(ids, mask, 8, 10000.0).key_mask.shape == (2, 1, 1, 4)
    assert attention_inputs(ids, mask, 8, 10000.0, block_length=2).key_mask.shape == (2, 1, 4, 4)
    assert NativeAdapter(tiny_module("llada"), char_tokenizer()).block_length is None
    assert NativeAdapter(tiny_llada2(), char_tokenizer()).block_length == 4


def cached_block_pass(model: LLaDA2Model, rows: list[torch.Tensor], slots: torch.Tensor, starts: list[int],
                      width: int, stops: list[int] | None = None) -> torch.Tensor:
    """One cached forward of positions starts[b] .. min(starts[b] + width, stops[b]) - 1 of each row
    (the rest of the width is padding); the slots hold whole rows (lengths = the rows' lengths)."""
    stops = stops or [len(r) for r in rows]
    pos = torch.tensor([[p if p < stop else -1 for p in range(s, s + width)] for s, stop in zip(starts, stops)])
    ids = torch.stack([torch.where(pos[b] >= 0, r[pos[b].clamp(min=0, max=len(r) - 1)], PAD)
                       for b, r in enumerate(rows)])
    lengths = torch.tensor([len(r) for r in rows])
    return model(ids, None, cache=CacheIndex(slots, pos, lengths))


@pytest.mark.parametrize("bl", [4, 5])
def test_a_block_against_the_cache_equals_the_uncached_forward(bl):
    # prefill the prompts' whole blocks, then forward each later block alone against the cache:
    # block-causal attention makes the cached keys/values exact
    model = tiny_llada2(seed=4, block_length=bl)
    tok = char_tokenizer()
    mask_id = CHAR_TOKEN_IDS["mask_token_id"]
    prompts = ["what is 12+30?", "hi"]
    rows = [torch.tensor(tok.encode(p) + [mask_id] * 9) for p in prompts]
    slots = torch.tensor([2, 0])
    model.setup_cache(3, max(map(len, rows)) + 2)
    whole = [len(tok.encode(p)) // bl * bl for p in prompts]       # positions of the whole prompt blocks
    width = max(whole)
    if width:
        cached_block_pass(model, rows, slots, [0, 0], width, stops=whole)
    full = [model(r[None])[0] for r in rows]
    for step in range(max(len(r) - w for r, w in zip(rows, whole)) // bl + 1):
        starts = [w + step * bl for w in whole]
        got = cached_block_pass(model, rows, slots, starts, bl)
        for b, r in enumerate(rows):
            n = max(0, min(bl, len(r) - starts[b]))
            assert torch.allclose(got[b, :n], full[b][starts[b]:starts[b] + n], atol=1e-5), (b, step)
    model.drop_cache()


def test_a_cached_block_ignores_stale_later_blocks_in_its_slot():
    model = tiny_llada2(seed=5)
    row = torch.tensor(char_tokenizer().encode("abcdefghijkl"))
    model.setup_cache(1, 12)
    slot = torch.tensor([0])
    cached_block_pass(model, [row], slot, [0], 12)              # every block written once
    changed = row.clone()
    changed[8:] = CHAR_TOKEN_IDS["mask_token_id"]
    cached_block_pass(model, [changed], slot, [8], 4)           # block 2 rewritten
    got = cached_block_pass(model, [changed], slot, [4], 4)     # block 1 must not see block 2
    assert torch.allclose(got[0], model(changed[None])[0, 4:8], atol=1e-5)


# ---------------------------------------------------------------- saving and loading


@pytest.mark.parametrize("shard_bytes", [None, 40_000])
def test_save_load_round_trip_gives_identical_logits(tmp_path, shard_bytes):
    module = tiny_llada2()
    path = save_model(module, char_tokenizer(), tmp_path / "m", max_shard_bytes=shard_bytes)
    assert (path / SAFE_INDEX).is_file() == (shard_bytes is not None)
    model = load_model(path)
    assert model.family == "llada2" and model.default_host == "block" and model.block_length == 4
    ids, mask = batch(["a prompt", "b"])
    assert torch.equal(model.logits(ids, mask), NativeAdapter(module, char_tokenizer()).logits(ids, mask))
    assert load_model(path, block_length=8).block_length == 8
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LLaDA2MoeModelLM"] and config["use_bias"] is False


def test_block_length_is_refused_for_a_bidirectional_family(tmp_path):
    path = save_model(tiny_module("llada"), char_tokenizer(), tmp_path / "llada")
    with pytest.raises(ModelLoadError, match="bidirectional"):
        load_model(path, block_length=8)


LLADA2_TEMPLATE = ("{% for m in messages %}{% set role = m['role'] | upper %}{% if role == 'USER' %}"
                   "{% set role = 'HUMAN' %}{% endif %}{{ '<role>' + role + '</role>' + m['content'] + "
                   "'<|role_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<role>ASSISTANT</role>' }}{% endif %}")


def rename_shards(path: Path) -> None:
    """Give save_model's shards the names model-0000i-of-0000n.safetensors of a published upload (index updated)."""
    index = json.loads((path / SAFE_INDEX).read_text())
    names = sorted(set(index["weight_map"].values()))
    renamed = {old: f"model-{i + 1:05d}-of-{len(names):05d}.safetensors" for i, old in enumerate(names)}
    for old, new in renamed.items():
        shutil.move(path / old, path / (new + ".tmp"))
    for new in renamed.values():
        shutil.move(path / (new + ".tmp"), path / new)
    index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
    (path / SAFE_INDEX).write_text(json.dumps(index))


def published_dir(tmp_path: Path) -> Path:
    """A tiny LLaDA2 in the vendor's layout: renamed shards with an index, tokenizer.json with the role
    tokens, tokenizer_config.json with the template, config.json in the vendor's keys (no mask id)."""
    from tokenizers import Tokenizer as HFTok, models, pre_tokenizers

    specials = ["<|endoftext|>", "<|mask|>", "<role>", "</role>", "<|role_end|>"]
    vocab = {c: i for i, c in enumerate(sorted(set("abcdefghijklmnopqrstuvwxyz ?ABCDEFGHIJKLMNOPQRSTUVWXYZ")))}
    inner = HFTok(models.WordLevel(vocab, unk_token="a"))
    inner.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    inner.add_special_tokens(specials)
    tok = Tokenizer(inner, {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "mask_token": "<|mask|>"},
                    LLADA2_TEMPLATE)
    ids = {t: tok.token_to_id(t) for t in specials}
    module = tiny_llada2(vocab_size=tok.vocab_size, pad_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|endoftext|>"], mask_token_id=ids["<|mask|>"], block_length=None)
    path = save_model(module, tok, tmp_path / "llada2", max_shard_bytes=30_000)
    rename_shards(path)
    config = {**MINI_JSON, **{k: v for k, v in module.config.to_dict().items() if k in MINI_JSON},
              "pad_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|endoftext|>"],
              "mask_token_id": ids["<|mask|>"]}
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_the_published_layout_loads_with_its_template(tmp_path):
    path = published_dir(tmp_path)
    check_model_dir(path)
    model = load_model(path)
    assert model.block_length == 32 and model.mask_id == model.tokenizer.token_to_id("<|mask|>")
    text = model.render_chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert text == "<role>SYSTEM</role>be brief<|role_end|><role>HUMAN</role>hi<|role_end|><role>ASSISTANT</role>"
    ids = torch.tensor([model.encode(text)])
    assert model.encode("<|role_end|>") == [model.tokenizer.token_to_id("<|role_end|>")]
    assert torch.isfinite(model.logits(ids, None)).all()


def test_import_prophet_loads_neither_ray_nor_deepspeed():
    import subprocess
    import sys

    code = "import sys, prophet, prophet.models.llada2; print([m for m in ('ray', 'deepspeed') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_training_step_runs_through_the_looped_experts():
    model = tiny_llada2().train()
    ids, mask = batch(["train me", "ok"])
    loss = F.cross_entropy(model(ids, mask).flatten(0, 1), ids.flatten())
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if ".experts." in n and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
