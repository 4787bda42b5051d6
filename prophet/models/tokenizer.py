"""A thin wrapper over `tokenizers.Tokenizer` used by every native family, and the tiny models'
character-level tokenizer (saved as a real tokenizer.json, so tiny and 8B models load alike)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from prophet.models.errors import ModelLoadError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"   # newer transformers write the template here
VOCAB_FILE = "vocab.json"                    # the slow byte-level BPE layout (Qwen2: Dream, DiffuCoder)
MERGES_FILE = "merges.txt"
# Qwen2's pre-tokenizer split (transformers' tokenization_qwen2.PRETOKENIZE_REGEX): contractions,
# letter runs with one leading non-letter, single digits, punctuation runs, newlines, whitespace.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Character tokenizer: specials first (their ids are fixed by this order), then printable ASCII and "\n".
CHAR_SPECIALS = {"pad": "<pad>", "mask": "<mask>", "eos": "<eos>", "eot": "<eot>", "bos": "<bos>", "unk": "<unk>"}
CHAR_ALPHABET = tuple(chr(c) for c in range(32, 127)) + ("\n",)
# Ids to put into a tiny model's config: LLaDAConfig(..., **CHAR_TOKEN_IDS).
CHAR_TOKEN_IDS = {f"{k}_token_id": i for i, k in enumerate(CHAR_SPECIALS) if k != "unk"}
# Tiny models are trained on bare task prompts, so their template only joins the message
# contents with newlines: a single user message renders to exactly the prompt text.
TINY_CHAT_TEMPLATE = ("{% for m in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
                      "{{ m['content'] }}{% endfor %}")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus its tokenizer_config.json (special tokens, chat template)."""

    def __init__(self, inner: tokenizers.Tokenizer, config: dict | None = None,
                 chat_template: str | None = None) -> None:
        self.inner = inner
        self.config = dict(config or {})
        self.chat_template = chat_template or _config_template(self.config)

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load tokenizer.json, or the slow vocab.json + merges.txt layout, with tokenizer_config.json
        and chat_template.jinja (optional; the .jinja file wins over a template in the config, as in
        transformers)."""
        path = Path(path)
        config_file = path / TOKENIZER_CONFIG_FILE
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        template_file = path / CHAT_TEMPLATE_FILE
        template = template_file.read_text() if template_file.is_file() else None
        file = path / TOKENIZER_FILE
        if file.is_file():
            return cls(tokenizers.Tokenizer.from_file(str(file)), config, template)
        if (path / VOCAB_FILE).is_file() and (path / MERGES_FILE).is_file():
            return cls(byte_level_bpe(path / VOCAB_FILE, path / MERGES_FILE, config), config, template)
        raise ModelLoadError(f"missing tokenizer file {file} (a fast tokenizer's tokenizer.json, or the "
                             f"byte-level BPE pair {VOCAB_FILE} + {MERGES_FILE}, is required)")

    def save(self, out_dir: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (with the chat template) into out_dir."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.inner.save(str(out / TOKENIZER_FILE))
        config = dict(self.config)
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (out / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.inner.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string, None where unknown."""
        return self.inner.token_to_id(token)

    def special_token(self, name: str) -> str | None:
        """tokenizer_config.json's string for e.g. "eos" (key eos_token), None where absent."""
        return _token_text(self.config.get(f"{name}_token"))

    def encode(self, text: str) -> list[int]:
        """Text -> ids; special-token strings in the text are recognised, none are added."""
        return self.inner.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Ids -> text."""
        return self.inner.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """Chat messages -> prompt text through the tokenizer's own chat template (sandboxed jinja2)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json 'chat_template' "
                             "or chat_template.jinja): pass a plain text prompt instead of messages")
        return _render(self.chat_template, messages, add_generation_prompt, self._template_tokens())

    def _template_tokens(self) -> dict[str, str]:
        names = ("bos", "eos", "unk", "pad", "mask", "sep", "cls")
        return {f"{n}_token": t for n in names if (t := self.special_token(n)) is not None}


def has_chat_template(path: str | Path) -> bool:
    """Whether a model directory ships a chat template (chat_template.jinja, or tokenizer_config.json's
    "chat_template"), read from the files alone: any family, no tokenizer built."""
    path = Path(path)
    if (path / CHAT_TEMPLATE_FILE).is_file():
        return True
    config_file = path / TOKENIZER_CONFIG_FILE
    try:
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{config_file} is not valid JSON ({e})") from None
    return bool(_config_template(config))


def byte_level_bpe(vocab_file: Path, merges_file: Path, config: dict) -> tokenizers.Tokenizer:
    """The Qwen2 byte-level BPE tokenizer from its slow files, as transformers' Qwen2Tokenizer builds it:
    NFC, Qwen2's split pattern then byte-level mapping, byte-level decoding, and tokenizer_config.json's
    added_tokens_decoder tokens at their ids."""
    try:
        vocab, merges = models.BPE.read_file(str(vocab_file), str(merges_file))
    except Exception as e:  # tokenizers raises its own error type for malformed files
        raise ModelLoadError(f"{vocab_file} / {merges_file} are not a BPE vocabulary and merges ({e})") from None
    inner = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                                            continuing_subword_prefix="", end_of_word_suffix="",
                                            fuse_unk=False, byte_fallback=False))
    inner.normalizer = normalizers.NFC()
    inner.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    inner.decoder = decoders.ByteLevel()
    _add_tokens_at_ids(inner, config.get("added_tokens_decoder") or {}, vocab_file.parent / TOKENIZER_CONFIG_FILE)
    return inner


def _add_tokens_at_ids(inner: tokenizers.Tokenizer, decoder: dict, source: Path) -> None:
    """Add added_tokens_decoder's tokens in id order and check each landed on its recorded id."""
    for key, spec in sorted(decoder.items(), key=lambda kv: int(kv[0])):
        want, text = int(key), spec["content"]
        token = AddedToken(text, single_word=spec.get("single_word", False), lstrip=spec.get("lstrip", False),
                           rstrip=spec.get("rstrip", False), normalized=spec.get("normalized", False),
                           special=spec.get("special", True))
        if spec.get("special", True):
            inner.add_special_tokens([token])
        else:
            inner.add_tokens([token])
        got = inner.token_to_id(text)
        if got != want:
            raise ModelLoadError(f"{source}: added token {text!r} is recorded at id {want} but lands at {got} "
                                 "(added_tokens_decoder must continue the vocabulary without gaps)")


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json holds a special token as a string or as an AddedToken dict.
    return value.get("content") if isinstance(value, dict) else value


def _config_template(config: dict) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        return named.get("default")
    return template


def _render(template: str, messages: Sequence[dict], add_generation_prompt: bool,
            tokens: dict[str, str]) -> str:
    # jinja2 arrives with torch; imported here so that plain text use does not pay for it.
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    # The same environment options as transformers' apply_chat_template, so templates render alike.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=list(messages),
                                            add_generation_prompt=add_generation_prompt, **tokens)


def char_tokenizer() -> Tokenizer:
    """The tiny models' tokenizer: 6 specials (ids 0-5, see CHAR_SPECIALS) + printable ASCII + newline."""
    vocab = {tok: i for i, tok in enumerate([*CHAR_SPECIALS.values(), *CHAR_ALPHABET])}
    # BPE with no merges splits text into single characters; Fuse joins them back without spaces.
    inner = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=CHAR_SPECIALS["unk"]))
    inner.decoder = decoders.Fuse()
    inner.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAR_SPECIALS.values()])
    config = {"tokenizer_class": "PreTrainedTokenizerFast",
              "clean_up_tokenization_spaces": False,
              **{f"{k}_token": t for k, t in CHAR_SPECIALS.items()}}
    return Tokenizer(inner, config, TINY_CHAT_TEMPLATE)
