"""Model directories in the layouts their authors publish them in, built here without the hub.

How the directories are built: a byte-level BPE vocabulary is trained in the test with `tokenizers`'
BpeTrainer (Qwen2's split + byte-level pre-tokenizer) and saved in the slow layout Dream-v0,
DiffuCoder and Dream-Coder ship (vocab.json + merges.txt + tokenizer_config.json with
added_tokens_decoder, no tokenizer.json); weights are a tiny native module saved by save_model and
then renamed into the shard names and index a published checkpoint uses; config.json is edited
to the published keys.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from prophet.models import DreamConfig, LLaDAConfig, ModelLoadError, Tokenizer, load_model, save_model
from prophet.models.loading import SAFE_INDEX, check_model_dir
from tests.test_models import tiny_module

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>", "<|beginoftext|>"]
TRAIN = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over 12345 lazy dogs.",
         "Ünïcödé — naïve café, 東京, Привет мир! 🙂", "x  =  [1,2,3]\t\t# tabs\n\n\nand   runs",
         "I'm sure they'll say it's fine; we've done it.", "if (x >= 10) { y += 2; }\r\n"] * 20
CORPUS = ["Hello world", "  leading and trailing  ", "numbers 3.14159 and 2026-12-03", "tab\tand\nnewline\n\n",
          "déjà vu 東京タワー 🙂🙃", "for i in range(10):\n        print(i ** 2)", "It's we'll THEY'RE",
          "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "a<|mask|><|mask|>b<|endoftext|>",
          "\u0065\u0301 composed vs \u00e9", "    \n   \n", "x" * 50, "!!!???...;;", "mixed123abc456"]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def slow_tokenizer_dir(path: Path, pad: str = "<|endoftext|>", template: str | None = None) -> Path:
    """vocab.json + merges.txt + tokenizer_config.json (added_tokens_decoder), as Dream-v0 ships them."""
    from tokenizers import Regex, Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers

    from prophet.models.tokenizer import QWEN2_SPLIT

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TRAIN, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(path))  # writes vocab.json and merges.txt
    n = tok.get_vocab_size()
    added = {str(n + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": True} for i, t in enumerate(SPECIALS)}
    config = {"tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added, "eos_token": "<|endoftext|>",
              "pad_token": pad, "mask_token": "<|mask|>", "bos_token": None, "unk_token": None,
              "errors": "replace", "model_max_length": 131072, "clean_up_tokenization_spaces": False}
    if template is not None:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return path


def test_slow_byte_level_bpe_equals_transformers_qwen2_tokenizer(tmp_path):
    from transformers import Qwen2TokenizerFast

    path = slow_tokenizer_dir(tmp_path / "tok")
    assert not (path / "tokenizer.json").exists()
    ours = Tokenizer.from_dir(path)
    theirs = Qwen2TokenizerFast.from_pretrained(str(path))
    for text in CORPUS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == theirs.decode(ids), text
    n = len(json.loads((path / "vocab.json").read_text()))
    assert [ours.token_to_id(t) for t in SPECIALS] == list(range(n, n + len(SPECIALS)))
    assert ours.encode("<|mask|>") == [n + 3]


def test_added_token_off_its_recorded_id_is_refused(tmp_path):
    path = slow_tokenizer_dir(tmp_path / "tok")
    config = json.loads((path / "tokenizer_config.json").read_text())
    decoder = config["added_tokens_decoder"]
    config["added_tokens_decoder"] = {str(int(k) + 5): v for k, v in decoder.items()}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="recorded at id .* but lands at"):
        Tokenizer.from_dir(path)


def dream_dir(tmp_path: Path, **tok_kw) -> Path:
    """A tiny Dream checkpoint whose tokenizer is the slow Qwen2 layout and ids come from it."""
    tok_path = slow_tokenizer_dir(tmp_path / "tok", **tok_kw)
    tok = Tokenizer.from_dir(tok_path)
    ids = {f"{k}_token_id": tok.token_to_id(t) for k, t in
           [("pad", "<|endoftext|>"), ("eos", "<|endoftext|>"), ("bos", "<|endoftext|>"), ("eot", "<|im_end|>"),
            ("mask", "<|mask|>")]}
    module = tiny_module("dream", vocab_size=tok.vocab_size, max_position_embeddings=96, **ids)
    out = save_model(module, tok_path, tmp_path / "dream")
    assert not (out / "tokenizer.json").exists() and (out / "vocab.json").is_file()
    return out


def _decode(model, texts: list[str]) -> torch.Tensor:
    from prophet.config import DecodeConfig
    from prophet.decode import decode

    prompts = [model.encode(t) for t in texts]
    return decode(model, prompts, DecodeConfig(gen_length=8, steps=4, block_length=8), seeds=[1, 2]).tokens


def test_dream_in_the_slow_tokenizer_layout_loads_and_decodes(tmp_path):
    model = load_model(dream_dir(tmp_path))
    tokens = _decode(model, ["def add(a, b):", "Hello"])
    assert tokens.shape == (2, 8) and int(tokens.max()) < model.vocab_size
    assert model.max_length == 96  # max_position_embeddings, not a generation max_length


def test_tokenizer_pad_differing_from_config_does_not_change_decoding(tmp_path):
    # DiffuCoder: tokenizer_config.json pads with one token (151667), config.json with another (151643).
    same = load_model(dream_dir(tmp_path / "a"))
    other = load_model(dream_dir(tmp_path / "b", pad="<|beginoftext|>"))
    assert other.tokenizer.token_to_id(other.tokenizer.special_token("pad")) != other.pad_id
    assert other.pad_id == same.pad_id  # config.json's ids are the ones used
    texts = ["def add(a, b):", "Hi"]    # different lengths: the short row is left-padded
    assert torch.equal(_decode(same, texts), _decode(other, texts))


def test_chat_template_file_wins_over_the_config_template(tmp_path):
    path = slow_tokenizer_dir(tmp_path / "tok", template="{{ 'from config' }}")
    assert Tokenizer.from_dir(path).render_chat([{"role": "user", "content": "x"}]) == "from config"
    (path / "chat_template.jinja").write_text(CHATML)
    rendered = Tokenizer.from_dir(path).render_chat([{"role": "user", "content": "x"}])
    assert rendered == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    (path / "chat_template.jinja").unlink()
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_dir(path).chat_template is None


def test_config_max_length_is_not_the_context_and_absent_fields_take_reference_defaults():
    d = DreamConfig.from_dict({"model_type": "Dream", "architectures": ["DreamModel"], "max_length": 20,
                               "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2})
    assert d.max_length == 32768          # configuration_dream.py's max_position_embeddings default
    assert d.rope_theta == 10000.0        # not Dream-v0's 1e6
    assert DreamConfig.from_dict({"max_position_embeddings": 131072, "max_length": 20}).max_length == 131072


@pytest.mark.parametrize("arch, named", [("LLaDAMoEModelLM", "missing tensor model.embed_tokens.weight"),
                                         ("LLaDAFutureModelLM", "LLaDAFutureModelLM")])
def test_llada_architectures_dispatch_by_name_and_unknown_ones_are_refused(tmp_path, arch, named):
    # model_type "llada" is dense LLaDA and LLaDA-MoE: the architecture decides, so dense weights under
    # LLaDA-MoE's name are refused as the wrong tensors, and an unknown architecture by its name
    _, path = _llada(tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": [arch]}))
    with pytest.raises(ModelLoadError, match=named):
        check_model_dir(path)
    with pytest.raises(ModelLoadError, match=named):
        load_model(path)


def _llada(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    from prophet.models import char_tokenizer

    module = tiny_module("llada")
    return module, save_model(module, char_tokenizer(), tmp_path / "llada")


def test_index_with_published_shard_names_is_honoured(tmp_path):
    # LLaDA-1.5 style: shards named by the publisher, not model-0000x-of-0000y; the index says where.
    module, path = _llada(tmp_path)
    shutil.rmtree(path)
    save_model(module, _char_dir(tmp_path), path, max_shard_bytes=30_000)
    index = json.loads((path / SAFE_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    renames = {old: f"pytorch_weights_part{i}.safetensors" for i, old in enumerate(shards)}
    for old, new in renames.items():
        (path / old).rename(path / new)
    index["weight_map"] = {k: renames[v] for k, v in index["weight_map"].items()}
    (path / SAFE_INDEX).write_text(json.dumps(index))
    (path / "model.safetensors").write_bytes(b"not used: the index wins")
    ids, mask = torch.tensor([[7, 8, 9]]), torch.ones(1, 3, dtype=torch.bool)
    assert torch.equal(load_model(path).logits(ids, mask), module(ids, mask))


def _char_dir(tmp_path: Path) -> Path:
    from prophet.models import char_tokenizer

    out = tmp_path / "chartok"
    char_tokenizer().save(out)
    return out


# ----------------------------------------------------------------------------- input.chat_template

def _plan(tmp_path: Path, model: Path, **input_over):
    from pipeline.config import validate_job_config
    from pipeline.run import plan_job

    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt": "def add(a, b):"}) + "\n")
    tree = {"input": {"path": str(inp), **input_over}, "output": {"dir": str(tmp_path / "out")},
            "model": {"dir": str(model)}, "decoding": {"gen_length": 8, "steps": 4, "block_length": 8}}
    return plan_job(validate_job_config(tree))


def test_chat_template_option_resolves_against_the_model(tmp_path):
    from pipeline.config import JobConfigError

    with_t = dream_dir(tmp_path / "t", template=CHATML)
    without = dream_dir(tmp_path / "n")
    auto = _plan(tmp_path, with_t)
    assert auto.chat_template and not _plan(tmp_path, with_t, chat_template="never").chat_template
    assert not _plan(tmp_path, without).chat_template  # auto: no template, text as is
    assert auto.settings_hash != _plan(tmp_path, with_t, chat_template="never").settings_hash
    with pytest.raises(JobConfigError, match="input.chat_template: 'always'"):
        _plan(tmp_path, without, chat_template="always")
    with pytest.raises(JobConfigError, match="input.chat_template"):
        _plan(tmp_path, with_t, chat_template="never", messages_column="messages")
    tok = Tokenizer.from_dir(with_t)
    assert auto.token_ids == {"mask": tok.token_to_id("<|mask|>"), "pad": tok.token_to_id("<|endoftext|>"),
                              "eos": tok.token_to_id("<|endoftext|>"), "eot": tok.token_to_id("<|im_end|>")}


def test_actor_renders_plain_prompts_as_one_user_message(tmp_path):
    import pyarrow as pa

    from pipeline import io as pio
    from pipeline.actor import ActorSpec, GenerateActor
    from prophet.config import DecodeConfig

    path = dream_dir(tmp_path, template=CHATML)
    decode = DecodeConfig(gen_length=8, steps=4, block_length=8).to_dict()
    out = {}
    for use in (True, False):
        spec = ActorSpec(model_dir=str(path), dtype="fp32", engine="torch", device="cpu", decode=decode, seed=0,
                         settings_hash="h", prompt_column="prompt", chat_template=use, drop_columns=(pio.ROW_KEY,))
        batch = pa.table({"prompt": ["def add(a, b):"], "id": ["r0"], pio.ROW_KEY: ["r0"]})
        out[use] = GenerateActor(spec)(batch)
    assert out[True].column("prompt").to_pylist() == \
        ["<|im_start|>user\ndef add(a, b):<|im_end|>\n<|im_start|>assistant\n"]
    assert out[False].column("prompt").to_pylist() == ["def add(a, b):"]
    assert set(out[True].column("status").to_pylist()) == {"ok"}


LLADA_FEATURES = {"block_type": "llama", "rope": True, "layer_norm_type": "rms", "activation_type": "silu",
                  "weight_tying": False}


def test_llada_absent_fields_take_configuration_llada_defaults():
    c = LLaDAConfig.from_dict({"model_type": "llada", "architectures": ["LLaDAModelLM"], **LLADA_FEATURES})
    # configuration_llada.py's ModelConfig: GPT-2 sizes, mlp_ratio * d_model, rope_theta 10,000
    assert (c.d_model, c.n_heads, c.n_kv_heads, c.n_layers, c.mlp_hidden_size) == (768, 12, 12, 12, 3072)
    assert (c.rope_theta, c.max_length, c.vocab_size, c.logit_width) == (10000.0, 1024, 50257, 50304)
    assert (c.mask_token_id, c.eos_token_id, c.pad_token_id) == (50256, 50256, 50256)
    assert LLaDAConfig.from_dict({**LLADA_FEATURES, "d_model": 64, "n_heads": 4, "mlp_ratio": 3}).mlp_hidden_size == 192


@pytest.mark.parametrize("key", sorted(LLADA_FEATURES))
def test_llada_absent_feature_whose_reference_default_is_unsupported_is_refused(key):
    raw = {k: v for k, v in LLADA_FEATURES.items() if k != key}
    with pytest.raises(ModelLoadError, match=f"no '{key}'"):
        LLaDAConfig.from_dict({"model_type": "llada", **raw})
