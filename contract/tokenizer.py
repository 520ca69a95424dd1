"""A model's tokenizer without torch or transformers: `tokenizers` for the ids, jinja2 for the chat
template, rendered exactly as transformers renders it. The planner counts a dataset's tokens with
it and the recipe's transformers tokenizer must agree token for token (tests/test_token_count.py).

Two sources:
- `FileTokenizer.from_dir(d)`: a saved tokenizer (tokenizer.json, tokenizer_config.json and, when
  present, chat_template.jinja), as in a model directory or a Hugging Face hub snapshot.
- `FileTokenizer.tiny()`: tiny-llama's byte-level tokenizer, built from the definition below,
  which `recipes/tiny.py` wraps for transformers: one definition, so the two cannot drift.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Optional

from contract.errors import UserError

# --- tiny-llama's tokenizer ------------------------------------------------------------------
# Byte-level with no merges: token id == byte value, then the special tokens. It needs no
# training data, so every machine that builds it gets the identical tokenizer.
TINY_SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
TINY_ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
BYTE_VOCAB = 256
TINY_VOCAB_SIZE = BYTE_VOCAB + len(TINY_SPECIAL_TOKENS) + len(TINY_ROLE_TOKENS)  # 262

# The assistant turn ends with eos so a fine-tuned model learns to stop; every rendering of a
# conversation prefix is a string prefix of the whole, which completion-only masking relies on.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + eos_token }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# transformers' named special tokens: the variables a chat template sees (special_tokens_map).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TokenizerFileError(UserError):
    """A tokenizer on disk that cannot be read."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, the alphabet of ByteLevel pre-tokenizers."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def tiny_backend():
    """tiny-llama's `tokenizers.Tokenizer`: ids 0-255 are bytes, then the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(BYTE_VOCAB)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(TINY_SPECIAL_TOKENS.values()) + TINY_ROLE_TOKENS)
    return backend


# --- chat templates, as transformers renders them --------------------------------------------

@lru_cache(maxsize=16)
def _compiled(template: str):
    """transformers' environment (utils/chat_template_utils.py): sandboxed, trim_blocks and
    lstrip_blocks, loop controls, its tojson (no HTML escaping), raise_exception, strftime_now and
    the `{% generation %}` block, which only marks text and renders it unchanged."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _token_text(value) -> Optional[str]:
    """A special token as tokenizer_config.json stores it: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _default_template(value) -> Optional[str]:
    """tokenizer_config.json's chat_template: one string, or named templates (the 'default' one)."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


class FileTokenizer:
    """The subset of a transformers tokenizer that `contract.dataset` uses, over `tokenizers`."""

    def __init__(self, backend, special_tokens: dict[str, str], chat_template: Optional[str], source: str):
        self.backend = backend
        self.special_tokens_map = {k: v for k, v in special_tokens.items() if k in SPECIAL_TOKEN_NAMES and v}
        self.chat_template = chat_template
        self.source = source  # where it was read from, for the plan's "counted with ..."

    @property
    def bos_token(self) -> Optional[str]:
        return self.special_tokens_map.get("bos_token")

    @property
    def eos_token(self) -> Optional[str]:
        return self.special_tokens_map.get("eos_token")

    @property
    def eos_token_id(self) -> Optional[int]:
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False) -> str:
        if tokenize:
            raise ValueError("FileTokenizer renders text only; tokenize the result")
        return _compiled(self.chat_template).render(messages=messages, tools=None, documents=None,
                                                    add_generation_prompt=add_generation_prompt,
                                                    **self.special_tokens_map)

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        return {"input_ids": [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]}

    @classmethod
    def tiny(cls) -> "FileTokenizer":
        return cls(tiny_backend(), TINY_SPECIAL_TOKENS, TINY_CHAT_TEMPLATE, "tiny-llama's byte-level tokenizer")

    @classmethod
    def from_dir(cls, directory: Path | str) -> "FileTokenizer":
        """A saved tokenizer: tokenizer.json, plus tokenizer_config.json and chat_template.jinja where present."""
        from tokenizers import Tokenizer

        directory = Path(directory)
        try:
            backend = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise TokenizerFileError(f"{directory / 'tokenizer.json'}: not a readable tokenizer ({e})") from None
        config = {}
        config_file = directory / "tokenizer_config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise TokenizerFileError(f"{config_file}: not readable JSON ({e})") from None
        special = {name: _token_text(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
        template_file = directory / "chat_template.jinja"
        # transformers reads chat_template.jinja over the config's template when both exist.
        template = template_file.read_text(encoding="utf-8") if template_file.is_file() else _default_template(config.get("chat_template"))
        return cls(backend, special, template, str(directory))
