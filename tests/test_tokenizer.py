"""The character tokenizer and the Tokenizer wrapper: ids, round trips, files, chat templates."""
from __future__ import annotations

import json

import pytest

from prophet.models import CHAR_TOKEN_IDS, ModelLoadError, Tokenizer, char_tokenizer
from prophet.models.tokenizer import CHAR_ALPHABET, CHAR_SPECIALS

# LLaDA-8B-Instruct's template (Llama-3 style), as its tokenizer_config.json carries it.
LLAMA3_STYLE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " 2+2? "}]


def with_template(template, **config) -> Tokenizer:
    tok = char_tokenizer()
    return Tokenizer(tok.inner, {**tok.config, **config}, template)


def test_special_ids_are_fixed_by_their_order():
    tok = char_tokenizer()
    assert [tok.token_to_id(t) for t in CHAR_SPECIALS.values()] == list(range(6))
    assert CHAR_TOKEN_IDS == {"pad_token_id": 0, "mask_token_id": 1, "eos_token_id": 2, "eot_token_id": 3,
                              "bos_token_id": 4}
    assert tok.vocab_size == 6 + 95 + 1


def test_every_character_is_one_token_and_round_trips():
    tok = char_tokenizer()
    text = "".join(CHAR_ALPHABET)
    ids = tok.encode(text)
    assert len(ids) == len(text) and len(set(ids)) == len(text) and min(ids) == 6
    assert tok.decode(ids) == text


def test_specials_in_text_are_recognised_and_none_are_added():
    tok = char_tokenizer()
    assert tok.encode("a<mask>b") == [tok.token_to_id("a"), 1, tok.token_to_id("b")]
    assert tok.encode("") == []
    assert tok.decode([2, 0]) == "<eos><pad>"
    assert tok.decode(tok.encode("x<eos><pad>"), skip_special_tokens=True) == "x"


def test_unknown_characters_map_to_unk():
    tok = char_tokenizer()
    assert tok.encode("é") == [tok.token_to_id("<unk>")]


def test_save_and_reload_keeps_ids_template_and_specials(tmp_path):
    tok = char_tokenizer()
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["mask_token"] == "<mask>" and config["chat_template"] == tok.chat_template
    again = Tokenizer.from_dir(tmp_path)
    text = "4x4: 1.3.\n<mask><eos>"
    assert again.encode(text) == tok.encode(text)
    assert again.special_token("eos") == "<eos>"
    assert again.render_chat([{"role": "user", "content": "q"}]) == "q"


def test_transformers_reads_the_saved_tokenizer_with_the_same_ids(tmp_path):
    transformers = pytest.importorskip("transformers")
    char_tokenizer().save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert (hf.mask_token_id, hf.pad_token_id, hf.eos_token_id, hf.bos_token_id) == (1, 0, 2, 4)
    assert hf.encode("ab<mask>", add_special_tokens=False) == char_tokenizer().encode("ab<mask>")


def test_missing_tokenizer_json_is_named(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="missing tokenizer file .*tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_tiny_template_joins_contents_so_one_message_is_the_bare_prompt():
    tok = char_tokenizer()
    assert tok.render_chat([{"role": "user", "content": "1.3.\n..2."}]) == "1.3.\n..2."
    assert tok.render_chat(MESSAGES) == "Be brief.\n 2+2? "


def test_llama3_style_template_renders_like_transformers(tmp_path):
    tok = with_template(LLAMA3_STYLE, bos_token="<|startoftext|>")
    ours = tok.render_chat(MESSAGES)
    assert ours == ("<|startoftext|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == ours


def test_template_file_and_named_templates_are_found(tmp_path):
    tok = char_tokenizer()
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "D:{{ messages[0]['content'] }}"},
                               {"name": "tool_use", "template": "T"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_dir(tmp_path).render_chat(MESSAGES) == "D:Be brief."
    (tmp_path / "chat_template.jinja").write_text("J:{{ messages | length }}")
    assert Tokenizer.from_dir(tmp_path).render_chat(MESSAGES) == "J:2"


def test_no_template_is_a_clear_error():
    tok = Tokenizer(char_tokenizer().inner, {})
    with pytest.raises(ValueError, match="no chat template.*plain text prompt"):
        tok.render_chat(MESSAGES)


def test_template_can_raise_and_is_sandboxed():
    from jinja2.exceptions import SecurityError, TemplateError

    with pytest.raises(TemplateError, match="roles must alternate"):
        with_template("{{ raise_exception('roles must alternate') }}").render_chat(MESSAGES)
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(SecurityError):
        with_template(escape).render_chat(MESSAGES)
