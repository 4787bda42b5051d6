"""The native families against transformers' own Llama/Qwen2 code, and the generic masked-LM adapter."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prophet import DecodeConfig, decode
from prophet.models import CHAR_TOKEN_IDS, DreamConfig, DreamModel, LLaDAConfig, LLaDAModel, ModelLoadError, load_model

transformers = pytest.importorskip("transformers")

WIDTH, HEADS, KV_HEADS, LAYERS, MLP, VOCAB = 32, 4, 2, 2, 64, 102

# LLaDA's names -> the same weights in transformers' Llama layout.
LLADA_TO_LLAMA = {
    "model.transformer.wte": "model.embed_tokens", "model.transformer.ln_f": "model.norm",
    "model.transformer.ff_out": "lm_head", "model.transformer.blocks": "model.layers",
    "attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm",
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj", "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj",
}


def llama_name(name: str) -> str:
    """model.transformer.blocks.0.ff_out.weight -> model.layers.0.mlp.down_proj.weight."""
    for prefix in ("model.transformer.wte", "model.transformer.ln_f", "model.transformer.ff_out"):
        if name.startswith(prefix + "."):
            return LLADA_TO_LLAMA[prefix] + name[len(prefix):]
    _, _, _, layer, part, leaf = name.split(".")
    return f"model.layers.{layer}.{LLADA_TO_LLAMA[part]}.{leaf}"


def hf_config(cls, theta: float, eps: float):
    return cls(hidden_size=WIDTH, intermediate_size=MLP, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
               num_hidden_layers=LAYERS, vocab_size=VOCAB, rope_theta=theta, rms_norm_eps=eps,
               tie_word_embeddings=False, max_position_embeddings=256)


def reference_logits(hf_model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """transformers' logits made bidirectional: a 4D (B, 1, L, L) mask is used as given, so keys are
    masked at pads only and no causal mask is added; positions restart at each row's first token."""
    keys = mask[:, None, None, :].expand(-1, 1, mask.shape[1], -1)          # (B, 1, L, L)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf_model(input_ids=ids, attention_mask=keys, position_ids=positions).logits


def padded_ids() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(6, VOCAB, (3, 11))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :4] = False  # left padding
    mask[2, :9] = False
    return ids.masked_fill(~mask, CHAR_TOKEN_IDS["pad_token_id"]), mask


def test_llada_matches_transformers_llama():
    torch.manual_seed(0)
    ours = LLaDAModel(LLaDAConfig(d_model=WIDTH, n_heads=HEADS, n_kv_heads=KV_HEADS, n_layers=LAYERS,
                                  mlp_hidden_size=MLP, vocab_size=VOCAB, **CHAR_TOKEN_IDS))
    ref = transformers.LlamaForCausalLM(hf_config(transformers.LlamaConfig, 500000.0, 1e-5)).eval()
    ref.load_state_dict({llama_name(k): v for k, v in ours.state_dict().items()}, strict=True)
    ids, mask = padded_ids()
    with torch.no_grad():
        mine = ours(ids, mask)
    torch.testing.assert_close(mine, reference_logits(ref, ids, mask), rtol=1e-4, atol=1e-5)


def test_dream_matches_transformers_qwen2():
    torch.manual_seed(0)
    ours = DreamModel(DreamConfig(hidden_size=WIDTH, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                  num_hidden_layers=LAYERS, intermediate_size=MLP, vocab_size=VOCAB,
                                  **CHAR_TOKEN_IDS))
    with torch.no_grad():  # non-zero biases, so that q/k/v biases are checked too
        for name, p in ours.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    ref = transformers.Qwen2ForCausalLM(hf_config(transformers.Qwen2Config, 1e6, 1e-6)).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)  # the same names: Dream is Qwen2's layout
    ids, mask = padded_ids()
    with torch.no_grad():
        mine = ours(ids, mask)
    torch.testing.assert_close(mine, reference_logits(ref, ids, mask), rtol=1e-4, atol=1e-5)


BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz0123456789",
              "hello", "world", "##s"]


def save_tiny_bert(path: Path) -> Path:
    """A random 2-layer BertForMaskedLM and a WordPiece tokenizer built here, saved like any HF dir."""
    torch.manual_seed(0)
    tok = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(BERT_VOCAB)})
    model = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=len(BERT_VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("bert"))


def test_generic_adapter_loads_a_local_bert(bert_dir):
    model = load_model(bert_dir)
    assert (model.family, model.default_host) == ("hf-mlm", "llada")
    assert (model.mask_id, model.pad_id, model.eos_id, model.eot_id) == (4, 0, 3, None)
    assert (model.max_length, model.vocab_size) == (64, len(BERT_VOCAB))
    assert model.encode("hello worlds") == [41, 42, 43]
    assert model.decode([41, 4]) == "hello [MASK]"
    ids = torch.tensor([model.encode("hello world")])
    logits = model.logits(ids, torch.ones_like(ids, dtype=torch.bool))
    assert logits.shape == (1, 2, len(BERT_VOCAB)) and torch.isfinite(logits).all()


def test_generic_adapter_left_padded_row_equals_row_unpadded(bert_dir):
    model = load_model(bert_dir)
    row, other = model.encode("a b c hello"), model.encode("hello world a b c d e")
    assert (len(row), len(other)) == (4, 7)
    ids = torch.tensor([[model.pad_id] * 3 + row, other])
    mask = ids != model.pad_id
    alone = model.logits(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.bool))
    torch.testing.assert_close(model.logits(ids, mask)[0, 3:], alone[0], rtol=1e-5, atol=1e-5)


def test_generic_adapter_decodes_a_batch_without_padding(bert_dir):
    """Equal-length prompts: the decoder passes no attention mask; the adapter reads it as all real."""
    model = load_model(bert_dir)
    ids = torch.tensor([model.encode("hello world"), model.encode("a b")])
    torch.testing.assert_close(model.logits(ids, None), model.logits(ids, torch.ones_like(ids, dtype=torch.bool)))
    cfg = DecodeConfig(gen_length=4, steps=4, block_length=4, rule="full")
    res = decode(model, [model.encode("hello world"), model.encode("a b")], cfg)
    assert res.tokens.shape == (2, 4) and (res.tokens != model.mask_id).all()


def test_generic_adapter_bf16(bert_dir):
    model = load_model(bert_dir, dtype=torch.bfloat16)
    assert next(model.module.parameters()).dtype == torch.bfloat16


def test_generic_adapter_without_template_says_so(bert_dir):
    with pytest.raises(ValueError, match="no chat template"):
        load_model(bert_dir).render_chat([{"role": "user", "content": "hi"}])


def test_generic_adapter_refuses_pickles(tmp_path):
    path = save_tiny_bert(tmp_path / "bert")
    state = transformers.BertForMaskedLM.from_pretrained(path).state_dict()
    (path / "model.safetensors").unlink()
    torch.save(state, path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="allow_pickle=True"):
        load_model(path)


def test_remote_code_configs_are_not_masked_lms_without_opt_in(tmp_path):
    path = save_tiny_bert(tmp_path / "custom")
    raw = json.loads((path / "config.json").read_text())
    raw.update(model_type="my-custom-mlm", auto_map={"AutoModelForMaskedLM": "modeling.MyModel"})
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match="unknown model_type 'my-custom-mlm'"):
        load_model(path)
    with pytest.raises(ModelLoadError, match="revision"):
        load_model(path, trust_remote_code=True)
