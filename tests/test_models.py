"""Native LLaDA / Dream families: names, save/load round trips, padding, the Dream shift, dtypes, errors."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from prophet.models import (CHAR_TOKEN_IDS, DreamConfig, DreamModel, LLaDAConfig, LLaDAModel, ModelLoadError,
                            NativeAdapter, char_tokenizer, load_model, save_model)
from prophet.types import TextDLM

FAMILIES = ("llada", "dream")


def tiny_module(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-layer, width-32 model of a family with the character tokenizer's ids."""
    torch.manual_seed(seed)
    vocab = char_tokenizer().vocab_size
    if family == "llada":
        kw = dict(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=64, vocab_size=vocab,
                  max_sequence_length=256, **CHAR_TOKEN_IDS)
        return LLaDAModel(LLaDAConfig(**{**kw, **overrides}))
    kw = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
              intermediate_size=64, vocab_size=vocab, **CHAR_TOKEN_IDS)
    return DreamModel(DreamConfig(**{**kw, **overrides}))


def saved(tmp_path: Path, family: str, name: str = "model", **save_kw) -> tuple[torch.nn.Module, Path]:
    """A tiny module and the directory it was saved to."""
    module = tiny_module(family)
    return module, save_model(module, char_tokenizer(), tmp_path / name, **save_kw)


def batch(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids (B, L) and bool attention mask for some texts."""
    tok = char_tokenizer()
    rows = [tok.encode(t) for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([[CHAR_TOKEN_IDS["pad_token_id"]] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows])
    return ids, mask


def test_llada_state_dict_names_are_the_published_ones():
    names = set(tiny_module("llada").state_dict())
    per_block = ("attn_norm", "ff_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")
    want = {f"model.transformer.blocks.{n}.{p}.weight" for n in range(2) for p in per_block}
    want |= {"model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"}
    assert names == want


def test_dream_state_dict_names_are_the_published_ones():
    names = set(tiny_module("dream").state_dict())
    want = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for n in range(2):
        p = f"model.layers.{n}."
        want |= {p + f"self_attn.{x}_proj.weight" for x in "qkvo"}
        want |= {p + f"self_attn.{x}_proj.bias" for x in "qkv"}  # o_proj has none
        want |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        want |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
    assert names == want


def test_llada_8b_shapes_from_spec_defaults():
    with torch.device("meta"):
        sd = LLaDAModel(LLaDAConfig()).state_dict()
    assert sd["model.transformer.wte.weight"].shape == (126464, 4096)
    assert sd["model.transformer.blocks.31.ff_proj.weight"].shape == (12288, 4096)
    assert sd["model.transformer.blocks.0.k_proj.weight"].shape == (4096, 4096)
    assert sd["model.transformer.ff_out.weight"].shape == (126464, 4096)
    assert sum(t.numel() for t in sd.values()) == pytest.approx(8.0e9, rel=0.03)


def test_dream_7b_shapes_from_spec_defaults():
    with torch.device("meta"):
        sd = DreamModel(DreamConfig()).state_dict()
    assert sd["model.layers.27.self_attn.k_proj.weight"].shape == (512, 3584)  # 4 KV heads of 128
    assert sd["model.layers.0.self_attn.k_proj.bias"].shape == (512,)
    assert sd["model.layers.0.mlp.gate_proj.weight"].shape == (18944, 3584)
    assert sd["lm_head.weight"].shape == (152064, 3584)


def test_real_llada_config_json_reads_spec_values():
    raw = {"architectures": ["LLaDAModelLM"], "model_type": "llada", "activation_type": "silu", "alibi": False,
           "auto_map": {"AutoModel": "modeling_llada.LLaDAModelLM"}, "block_type": "llama", "d_model": 4096,
           "embedding_size": 126464, "eos_token_id": 126081, "include_bias": False, "include_qkv_bias": False,
           "layer_norm_type": "rms", "mask_token_id": 126336, "max_sequence_length": 4096,
           "mlp_hidden_size": 12288, "mlp_ratio": 4, "multi_query_attention": None, "n_heads": 32,
           "n_kv_heads": 32, "n_layers": 32, "pad_token_id": 126081, "rms_norm_eps": 1e-05, "rope": True,
           "rope_theta": 500000.0, "scale_logits": False, "vocab_size": 126464, "weight_tying": False}
    c = LLaDAConfig.from_dict(raw)
    assert (c.d_model, c.n_kv_heads, c.logit_width, c.max_length) == (4096, 32, 126464, 4096)
    assert (c.mask_token_id, c.eos_token_id, c.pad_token_id, c.eot_token_id, c.bos_token_id) == \
        (126336, 126081, 126081, 126348, 126080)


def test_token_ids_fall_back_to_spec_defaults_per_family():
    d = DreamConfig.from_dict({"model_type": "Dream", "hidden_size": 64, "num_attention_heads": 4,
                               "num_key_value_heads": 2})
    assert (d.mask_token_id, d.pad_token_id, d.eos_token_id, d.bos_token_id) == (151666, 151643, 151643, 151643)
    assert d.max_length == 32768  # configuration_dream.py's max_position_embeddings default
    assert DreamConfig.from_dict({"max_length": 4096}).max_length == 32768  # a generation default, unread


@pytest.mark.parametrize("key, value", [("weight_tying", True), ("include_bias", True), ("alibi", True)])
def test_unsupported_llada_feature_is_refused(key, value):
    with pytest.raises(ModelLoadError, match=key):
        LLaDAConfig.from_dict({"model_type": "llada", key: value})


def test_config_json_carries_the_family_keys(tmp_path):
    for family, model_type, arch in [("llada", "llada", "LLaDAModelLM"), ("dream", "Dream", "DreamModel")]:
        _, path = saved(tmp_path, family, name=family)
        raw = json.loads((path / "config.json").read_text())
        assert (raw["model_type"], raw["architectures"]) == (model_type, [arch])
        assert raw["mask_token_id"] == CHAR_TOKEN_IDS["mask_token_id"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shard_bytes", [None, 30_000])
def test_save_load_round_trip_gives_identical_logits(tmp_path, family, shard_bytes):
    module, path = saved(tmp_path, family, max_shard_bytes=shard_bytes)
    shards = sorted(p.name for p in path.glob("model*.safetensors"))
    if shard_bytes is None:
        assert shards == ["model.safetensors"]
    else:
        assert len(shards) > 1 and all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", s) for s in shards)
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(module.state_dict())
        assert sorted(set(index["weight_map"].values())) == shards
    model = load_model(path)
    ids, mask = batch(["4x4 sudoku: 1.3.", "hi"])
    assert torch.equal(model.module(ids, mask), module(ids, mask))
    assert all(p.device.type == "cpu" for p in model.module.parameters())  # nothing left on meta


def test_resaving_with_another_layout_removes_the_old_shards(tmp_path):
    module, path = saved(tmp_path, "llada", max_shard_bytes=30_000)
    save_model(module, char_tokenizer(), path)
    assert sorted(p.name for p in path.glob("model*")) == ["model.safetensors"]
    assert torch.equal(load_model(path).module.state_dict()["model.transformer.wte.weight"],
                       module.state_dict()["model.transformer.wte.weight"])


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_row_equals_the_row_unpadded(family):
    module = tiny_module(family)
    texts = ["a longer prompt, 12+7=19", "short"]
    ids, mask = batch(texts)
    padded = module(ids, mask)
    for row, text in enumerate(texts):
        alone_ids, alone_mask = batch([text])
        alone = module(alone_ids, alone_mask)[0]
        torch.testing.assert_close(padded[row, mask[row]], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_row_of_only_padding_gives_finite_logits(family):
    ids, mask = batch(["abc", ""])
    assert not mask[1].any()
    assert torch.isfinite(tiny_module(family)(ids, mask)).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_is_bidirectional(family):
    module = tiny_module(family)
    ids, mask = batch(["abcdef"])
    changed = ids.clone()
    changed[0, -1] = CHAR_TOKEN_IDS["mask_token_id"]
    # A change at the last position must reach the first (a causal model would not see it).
    assert not torch.allclose(module(ids, mask)[0, 0], module(changed, mask)[0, 0])


def test_dream_adapter_shifts_logits_right_by_one(tmp_path):
    _, path = saved(tmp_path, "dream")
    model = load_model(path)
    ids, mask = batch(["shift me", "x"])
    raw = model.module(ids, mask)
    aligned = model.logits(ids, mask)
    assert torch.equal(aligned[:, 1:], raw[:, :-1])
    assert torch.equal(aligned[:, 0], raw[:, 0])


def test_llada_adapter_does_not_shift(tmp_path):
    _, path = saved(tmp_path, "llada")
    model = load_model(path)
    ids, mask = batch(["no shift"])
    assert torch.equal(model.logits(ids, mask), model.module(ids, mask))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_load_agrees_with_fp32(tmp_path, family, dtype):
    _, path = saved(tmp_path, family)
    fp32, half = load_model(path), load_model(path, dtype=dtype)
    assert all(p.dtype == dtype for p in half.module.parameters())
    ids, mask = batch(["1.3.2..4", "agree"])
    ref, low = fp32.logits(ids, mask), half.logits(ids, mask)
    assert low.dtype == dtype
    err = (low.float() - ref)[mask].abs().max()
    assert err <= 0.02 * ref[mask].abs().max() + 1e-3


def test_bf16_checkpoint_loads_to_fp32(tmp_path):
    module = tiny_module("dream").to(torch.bfloat16)
    path = save_model(module, char_tokenizer(), tmp_path / "bf16")
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = load_model(path, dtype=torch.float32)
    w = model.module.state_dict()["lm_head.weight"]
    assert w.dtype == torch.float32 and torch.equal(w, module.state_dict()["lm_head.weight"].float())


def test_adapter_is_a_text_dlm_with_ids_from_config(tmp_path):
    _, path = saved(tmp_path, "llada", name="tiny-llada")
    model = load_model(path)
    assert isinstance(model, TextDLM) and isinstance(model, NativeAdapter)
    assert (model.family, model.default_host, model.name) == ("llada", "llada", "tiny-llada")
    assert (model.mask_id, model.pad_id, model.eos_id, model.eot_id) == (1, 0, 2, 3)
    assert (model.max_length, model.vocab_size, model.device) == (256, 102, torch.device("cpu"))
    assert model.decode(model.encode("12+7=19\n")) == "12+7=19\n"
    assert model.render_chat([{"role": "user", "content": "1.3."}]) == "1.3."


def test_dream_adapter_defaults(tmp_path):
    _, path = saved(tmp_path, "dream")
    model = load_model(path)
    assert (model.family, model.default_host, model.max_length) == ("dream", "dream", 131072)


def test_adapter_module_can_be_replaced_by_a_wrapper(tmp_path):
    # The pipeline swaps .module for a DeepSpeed engine: anything called as
    # module(ids, mask, logits_to_keep=k).
    _, path = saved(tmp_path, "dream")
    model = load_model(path)
    ids, mask = batch(["wrap"])
    before = model.logits(ids, mask)
    inner = model.module
    model.module = lambda i, m, **kw: inner(i, m, **kw) * 2
    assert torch.equal(model.logits(ids, mask), before * 2)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_logits_of_the_last_positions_equal_the_tail_of_all_logits(tmp_path, family):
    # the decoder asks for the window only; Dream needs one more raw position for its shift
    _, path = saved(tmp_path, family)
    model = load_model(path)
    ids, mask = batch(["a longer prompt", "short"])  # left padded
    full = model.logits(ids, mask)
    L = ids.shape[1]
    for last in (1, 5, L - 1, L):
        tail = model.logits(ids, mask, last=last)
        assert tail.shape == (2, last, model.vocab_size)
        torch.testing.assert_close(tail, full[:, L - last:], rtol=1e-5, atol=1e-5)


def test_family_comes_from_config_not_from_the_path(tmp_path):
    _, path = saved(tmp_path, "llada", name="dream")
    assert load_model(path).family == "llada"
    raw = json.loads((path / "config.json").read_text())
    raw.pop("model_type")  # architectures alone also decide
    (path / "config.json").write_text(json.dumps(raw))
    assert load_model(path).family == "llada"


def test_name_prefers_config_name_or_path(tmp_path):
    module = tiny_module("llada")
    path = save_model(module, char_tokenizer(), tmp_path / "x", extra_config={"_name_or_path": "GSAI-ML/tiny"})
    assert load_model(path).name == "GSAI-ML/tiny"


# ---- errors that name the thing at fault ----

def test_missing_config_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path)


def test_unknown_model_type_is_named(tmp_path):
    _, path = saved(tmp_path, "llada")
    (path / "config.json").write_text(json.dumps({"model_type": "gpt-nonexistent", "architectures": ["Foo"]}))
    with pytest.raises(ModelLoadError, match="unknown model_type 'gpt-nonexistent'"):
        load_model(path)


def test_missing_shard_is_named(tmp_path):
    _, path = saved(tmp_path, "llada", max_shard_bytes=30_000)
    second = sorted(path.glob("model-*.safetensors"))[1]
    second.unlink()
    with pytest.raises(ModelLoadError, match=f"missing shard file .*{second.name}"):
        load_model(path)


def _rewrite_weights(path: Path, edit) -> None:
    state = load_file(str(path / "model.safetensors"))
    edit(state)
    save_file(state, str(path / "model.safetensors"))


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path):
    _, path = saved(tmp_path, "llada")
    name = "model.transformer.blocks.1.up_proj.weight"
    _rewrite_weights(path, lambda s: s.__setitem__(name, torch.zeros(48, 32)))
    with pytest.raises(ModelLoadError, match=re.escape(f"{name}: checkpoint has [48, 32], config.json implies [64, 32]")):
        load_model(path)


def test_missing_tensor_is_named(tmp_path):
    _, path = saved(tmp_path, "dream")
    _rewrite_weights(path, lambda s: s.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(ModelLoadError, match="missing tensor model.layers.1.self_attn.k_proj.bias"):
        load_model(path)


def test_unexpected_tensor_is_named(tmp_path):
    _, path = saved(tmp_path, "dream")
    _rewrite_weights(path, lambda s: s.__setitem__("model.layers.0.self_attn.o_proj.bias", torch.zeros(32)))
    with pytest.raises(ModelLoadError, match="unexpected tensor model.layers.0.self_attn.o_proj.bias"):
        load_model(path)


def test_rotary_buffers_in_a_checkpoint_are_ignored(tmp_path):
    _, path = saved(tmp_path, "dream")
    _rewrite_weights(path, lambda s: s.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(4)))
    assert load_model(path).family == "dream"


def test_tensor_missing_from_its_indexed_shard_is_named(tmp_path):
    _, path = saved(tmp_path, "llada", max_shard_bytes=30_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.transformer.ln_f.weight"] = sorted(path.glob("model-*.safetensors"))[0].name
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="model.transformer.ln_f.weight .*missing from shard"):
        load_model(path)


def test_missing_tokenizer_is_named(tmp_path):
    _, path = saved(tmp_path, "llada")
    (path / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="missing tokenizer file .*tokenizer.json"):
        load_model(path)


def _as_pickle(path: Path, module: torch.nn.Module, name: str = "pytorch_model.bin") -> None:
    (path / "model.safetensors").unlink()
    torch.save(module.state_dict(), path / name)


def test_pickled_checkpoint_is_refused_naming_the_opt_in(tmp_path):
    module, path = saved(tmp_path, "llada")
    _as_pickle(path, module)
    with pytest.raises(ModelLoadError, match=r"pytorch_model.bin.*allow_pickle=True"):
        load_model(path)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "weights.pt"])
def test_pickled_checkpoint_loads_with_opt_in(tmp_path, name):
    module, path = saved(tmp_path, "dream")
    _as_pickle(path, module, name)
    (path / "training_args.bin").write_bytes(b"never read")  # a Trainer pickle next to it is skipped
    model = load_model(path, allow_pickle=True, dtype=torch.bfloat16)
    ids, mask = batch(["pickle"])
    assert next(model.module.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(model.module(ids, mask).float(), module.to(torch.bfloat16)(ids, mask).float())


def test_safetensors_win_over_pickles(tmp_path):
    module, path = saved(tmp_path, "llada")
    (path / "pytorch_model.bin").write_bytes(b"not even a pickle")  # must never be opened
    assert load_model(path).family == "llada"


def test_no_weights_is_named(tmp_path):
    _, path = saved(tmp_path, "llada")
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no weights .*model.safetensors"):
        load_model(path)


def test_trust_remote_code_needs_a_pinned_revision(tmp_path):
    _, path = saved(tmp_path, "llada")
    with pytest.raises(ModelLoadError, match="revision"):
        load_model(path, trust_remote_code=True)
    with pytest.raises(ModelLoadError, match="revision"):
        load_model(path, trust_remote_code=True, revision="main")
    assert load_model(path, trust_remote_code=True, revision="a" * 40).family == "llada"


def test_save_copies_tokenizer_files_from_a_path(tmp_path):
    module, first = saved(tmp_path, "llada")
    second = save_model(module, first / "tokenizer.json", tmp_path / "copy")
    assert (second / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()
    assert load_model(second).render_chat([{"role": "user", "content": "q"}]) == "q"
    shutil.rmtree(first)
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        save_model(module, tmp_path / "nowhere", tmp_path / "third")


def test_import_does_not_pull_transformers_or_jinja():
    code = "import sys, prophet.models; print(sorted(m for m in ('transformers', 'jinja2', 'ray', 'deepspeed') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_mask_means_no_padding_and_takes_the_maskless_attention_path():
    # attention_mask None lets SDPA pick its flash kernel on GPU; the caller knows there is no
    # padding without asking the device, so a given mask is always applied (no host sync)
    from prophet.models.layers import attention_inputs

    ids, _ = batch(["same", "size"])
    full = attention_inputs(ids, torch.ones_like(ids, dtype=torch.bool), 8, 10000.0)
    none = attention_inputs(ids, None, 8, 10000.0)
    assert none.key_mask is None and full.key_mask is not None
    assert torch.equal(full.cos, none.cos) and torch.equal(full.sin, none.sin)


def adapter_for(family: str, seed: int = 0) -> NativeAdapter:
    return NativeAdapter(tiny_module(family, seed).eval(), char_tokenizer())


@pytest.mark.parametrize("family", FAMILIES)
def test_a_refresh_pass_scores_as_the_plain_forward(family):
    model = adapter_for(family)
    ids, mask = batch(["a longer prompt 12", "short 3", "mid 45"])
    B, L = ids.shape
    model.setup_cache(5, L + 4)
    first = torch.tensor([L - 6, L - 9, L - 6])
    got = model.cached_logits(ids, mask, torch.tensor([4, 0, 2]), first, 6, refresh=True)
    full = model.logits(ids, mask)
    want = torch.stack([full[b, first[b]:first[b] + 6] for b in range(B)])
    assert torch.allclose(got, want, atol=1e-5)
    model.drop_cache()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_cached_pass_over_unchanged_tokens_equals_the_plain_forward(family):
    # keys/values cached at the refresh are exact while nothing changes, so scoring only the last
    # positions against the cache must give the full forward's logits (Dream runs one more position)
    model = adapter_for(family, seed=1)
    ids, mask = batch(["first row text", "second", "x"])
    B, L = ids.shape
    slots = torch.tensor([1, 2, 0])
    model.setup_cache(3, L)
    first = torch.full((B,), L - 5)
    model.cached_logits(ids, mask, slots, first, 5, refresh=True)
    got = model.cached_logits(ids, mask, slots, first, 5, refresh=False)
    assert torch.allclose(got, model.logits(ids, mask)[:, L - 5:], atol=1e-5)
    # a changed token reaches the scored positions only through its cached key/value: stale until refreshed
    changed = ids.clone()
    changed[:, L - 7] = CHAR_TOKEN_IDS["mask_token_id"]
    stale = model.cached_logits(changed, mask, slots, first, 5, refresh=False)
    assert torch.allclose(stale, got, atol=1e-5)
    fresh = model.cached_logits(changed, mask, slots, first, 5, refresh=True)
    assert not torch.allclose(fresh, got, atol=1e-4)
    assert torch.allclose(fresh, model.logits(changed, mask)[:, L - 5:], atol=1e-5)


def test_cache_memory_is_the_slots_times_their_length():
    module = tiny_module("llada")
    module.setup_cache(3, 40)
    blocks = module.model["transformer"]["blocks"]
    # per layer keys and values of (slots, length + 1 scratch, kv heads, head dim)
    assert all(b.kv_cache.k.shape == (3, 41, 2, 8) and b.kv_cache.v.shape == (3, 41, 2, 8) for b in blocks)
    assert not any(k.endswith(("kv_cache.k", "kv_cache.v")) for k in module.state_dict())
    module.drop_cache()
    assert all(b.kv_cache is None for b in blocks)
