"""Text <-> token ids with the model's own vocabulary, built by the `tokenizers` library (no torch).

From a GGUF file, the tokenizer is rebuilt from what the file stores (`tokenizer.ggml.*`):
- a byte-level BPE (GPT-2 style, `tokenizer.ggml.model` = "gpt2") from the tokens and merges, in file order;
- the pre-tokenizer llama.cpp uses for the file's `tokenizer.ggml.pre`: for "smollm" (SmolLM2) digits are
  split one by one before GPT-2's split pattern (no prefix space), as in SmolLM2's own tokenizer.json.
  (transformers' GGUF conversion leaves the digit split out, so its ids differ around numbers: 52,755 tokens
  here vs 52,803 there on all of Hamlet, the same everywhere else);
- tokens of type 3 (control) are special: <|endoftext|>, <|im_start|>, <|im_end|>, ... They are matched as
  whole tokens in text and can be left out when decoding;
- the chat template (`tokenizer.chat_template`, Jinja) for instruct models.

A folder with `tokenizer.json` (and optionally HF's `tokenizer_config.json`: bos/eos tokens, chat template)
loads too; `Tokenizer.save(folder)` writes both, so a fused model folder carries its tokenizer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from reffuse.errors import ReffuseError
from reffuse.files import read_json
from reffuse.optional import require

# SmolLM2's chat format (ChatML), used when a tokenizer has no chat template of its own.
CHAT_TEMPLATE_SECONDS = 2.0        # a chat template that takes longer, or writes more, is refused
CHAT_TEMPLATE_CHARS = 1_000_000
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# llama.cpp's `tokenizer.ggml.pre` values whose split is digits one by one, then GPT-2's pattern.
DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell"}
GPT2_PRE = {"gpt2", "default", None}
TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4  # llama.cpp's token types (1 = normal)


class Tokenizer:
    """Encoding, decoding, special tokens and the chat format of one model."""

    def __init__(self, backend, bos_token: str | None, eos_token: str | None, chat_template: str | None,
                 add_bos: bool, source: str, pre: str | None = None):
        self.backend = backend  # a tokenizers.Tokenizer
        self.pre = pre          # llama.cpp's name of the pre-tokenizer ("smollm": digits one by one; "gpt2")
        self.bos_token, self.eos_token = bos_token, eos_token
        self.chat_template, self.add_bos, self.source = chat_template, add_bos, source
        self.bos_id = backend.token_to_id(bos_token) if bos_token else None
        self.eos_id = backend.token_to_id(eos_token) if eos_token else None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token -> id."""
        return {t.content: i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. "<|im_end|>") become their ids."""
        if not isinstance(text, str):
            raise ReffuseError(f"text to encode must be a string, got {type(text).__name__}")
        if not text:
            raise ReffuseError("the text to encode is empty: give at least one character")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if self.add_bos and self.bos_id is not None else ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ReffuseError(f"token id {bad[0]} is out of range for the vocabulary of {self.vocab_size} "
                               f"({len(bad)} such ids)")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def chat_prompt(self, messages, add_generation_prompt: bool = True) -> str:
        """The model's chat format for `messages` ([{"role": ..., "content": ...}], or one user message as a
        str), ending with the assistant's turn opened, from the tokenizer's template (ChatML if it has none)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not messages or any(not m.get("content") for m in messages):
            raise ReffuseError("a chat needs at least one message, each with non-empty content")
        jinja2 = require("jinja2", "real", "the chat format")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        deadline = time.monotonic() + CHAT_TEMPLATE_SECONDS
        source = self.source

        def check_time():
            if time.monotonic() > deadline:
                raise ReffuseError(f"the chat template of {source} ran longer than {CHAT_TEMPLATE_SECONDS:g} s: it "
                                   "is not a usable chat format (give another tokenizer)")

        class Bounded(ImmutableSandboxedEnvironment):
            """The sandbox, with the time limit checked at every call the template makes (a loop needs one)."""

            def call(self, context, obj, *args, **kwargs):
                check_time()
                return super().call(context, obj, *args, **kwargs)

        def raise_exception(message):
            raise ReffuseError(f"the chat template of {self.source} refused the messages: {message}")

        env = Bounded(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            template = env.from_string(self.chat_template or CHATML_TEMPLATE)
            pieces, size = [], 0
            for piece in template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                           bos_token=self.bos_token or "", eos_token=self.eos_token or ""):
                size += len(piece)
                if size > CHAT_TEMPLATE_CHARS:
                    raise ReffuseError(f"the chat template of {self.source} wrote more than {CHAT_TEMPLATE_CHARS} "
                                       "characters: it is not a usable chat format (give another tokenizer)")
                check_time()
                pieces.append(piece)
        except (jinja2.TemplateError, OverflowError, RecursionError) as e:
            raise ReffuseError(f"the chat template of {self.source} could not be rendered "
                               f"({type(e).__name__}: {e}): give another tokenizer") from None
        return "".join(pieces)

    def save(self, folder) -> Path:
        """Write tokenizer.json and tokenizer_config.json (HF's layout) into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
                  "eos_token": self.eos_token, "add_bos_token": self.add_bos, "chat_template": self.chat_template}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
        return folder


class StreamDecoder:
    """Text of a growing sequence of token ids, released piece by piece as tokens arrive (for streaming).

    One character can span several byte-level tokens; text is held back while it ends in an incomplete one.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.shown = 0  # characters already released

    def add(self, token_id: int) -> str:
        """The new text that token_id completes ("" while a character is still incomplete)."""
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, self.skip_special_tokens)
        if text.endswith("\ufffd"):
            return ""
        new, self.shown = text[self.shown:], len(text)
        return new


def tokenizer_from_gguf(path, reader=None) -> Tokenizer:
    """The tokenizer stored in a GGUF file (byte-level BPE vocabularies, llama.cpp's "gpt2" model)."""
    from reffuse.formats.gguf import metadata_value, open_gguf
    tk = require("tokenizers", "real", "tokenizing text")
    reader = reader or open_gguf(path)

    def value(key, default=None):
        return metadata_value(reader, f"tokenizer.{key}", default)

    kind, pre = value("ggml.model"), value("ggml.pre")
    if kind != "gpt2":
        raise ReffuseError(f"{path}: tokenizer.ggml.model is {kind!r}; reffuse builds byte-level BPE tokenizers "
                           "('gpt2') from GGUF files")
    if pre not in DIGIT_SPLIT_PRE | GPT2_PRE:
        raise ReffuseError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported (known: "
                           f"{', '.join(sorted(DIGIT_SPLIT_PRE | {'gpt2'}))})")
    tokens, merges = value("ggml.tokens"), value("ggml.merges")
    if not tokens or not merges:
        raise ReffuseError(f"{path}: tokenizer.ggml.tokens or tokenizer.ggml.merges is missing")
    types = value("ggml.token_type") or [1] * len(tokens)
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    for i, pair in enumerate(pairs):
        if len(pair) != 2 or pair[0] not in vocab or pair[1] not in vocab or pair[0] + pair[1] not in vocab:
            raise ReffuseError(f"{path}: tokenizer.ggml.merges entry {i} ({merges[i]!r}) names a token that is not "
                               "in tokenizer.ggml.tokens: the tokenizer in this file is corrupt")

    bpe = tk.models.BPE(vocab=vocab, merges=pairs)
    backend = tk.Tokenizer(bpe)
    byte_level = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.pre_tokenizer = (tk.pre_tokenizers.Sequence([tk.pre_tokenizers.Digits(individual_digits=True),
                                                         byte_level])
                             if pre in DIGIT_SPLIT_PRE else byte_level)
    backend.decoder = tk.decoders.ByteLevel()
    backend.add_tokens([tk.AddedToken(t, special=types[i] == TOKEN_TYPE_CONTROL, normalized=False)
                        for i, t in enumerate(tokens) if types[i] in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)])

    def token(key):
        token_id = value(f"ggml.{key}")
        return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

    return Tokenizer(backend, token("bos_token_id"), token("eos_token_id"), value("chat_template"),
                     bool(value("ggml.add_bos_token", False)), str(path),
                     pre="smollm" if pre in DIGIT_SPLIT_PRE else "gpt2")


def tokenizer_from_folder(folder) -> Tokenizer:
    """The tokenizer of a model folder: tokenizer.json, plus tokenizer_config.json if present."""
    tk = require("tokenizers", "real", "tokenizing text")
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ReffuseError(f"{folder} has no tokenizer.json: save one beside the model (Tokenizer.save), or "
                           "give the model's .gguf file")
    try:
        backend = tk.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise ReffuseError(f"{path} could not be read as a tokenizer ({e})") from None
    config = {}
    if (folder / "tokenizer_config.json").is_file():
        config = read_json(folder / "tokenizer_config.json", "write it again, or remove it to use the tokenizer "
                           "without special tokens and chat template")

    def token(key):  # HF writes a special token as a string or as {"content": ...}
        entry = config.get(key)
        return entry.get("content") if isinstance(entry, dict) else entry

    digits = '"Digits"' in backend.to_str()  # a Digits pre-tokenizer: llama.cpp's "smollm" split
    return Tokenizer(backend, token("bos_token"), token("eos_token"), config.get("chat_template"),
                     bool(config.get("add_bos_token", False)), str(folder), pre="smollm" if digits else "gpt2")
