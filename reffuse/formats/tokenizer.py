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

import contextlib
import functools
import json
import os
import select
import signal
import time
from pathlib import Path

from reffuse.errors import ReffuseError
from reffuse.files import check_regular_file, read_json
from reffuse.optional import require

# A chat template that takes longer, or writes more, is refused. Real ones take milliseconds: the limit is far
# above them, so that a loaded machine never trips it, and it ends a template that would never end.
CHAT_TEMPLATE_SECONDS = 10.0
CHAT_TEMPLATE_CHARS = 1_000_000
# SmolLM2's chat format (ChatML), used when a tokenizer has no chat template of its own.
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
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # bytes that were not UTF-8 (Python keeps them as lone surrogates)
            raise ReffuseError(f"the text to encode is not valid UTF-8 (character {e.start}, "
                               f"{text[e.start:e.end].encode('utf-8', 'surrogateescape')!r}): give UTF-8 text") from None
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
        str), ending with the assistant's turn opened, from the tokenizer's template (ChatML if it has none).

        The template is a program that came with the model: it runs in a sandbox, in a child process that is
        ended after CHAT_TEMPLATE_SECONDS whatever it is doing (a check between the template's steps cannot stop
        one long step), and what it writes is bounded by CHAT_TEMPLATE_CHARS."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not messages or any(not isinstance(m, dict) or not m.get("content") for m in messages):
            raise ReffuseError("a chat needs at least one message, each with non-empty content")
        require("jinja2", "real", "the chat format")
        render = functools.partial(_render_chat, self.chat_template or CHATML_TEMPLATE, self.source, messages,
                                   add_generation_prompt, self.bos_token or "", self.eos_token or "")
        if not hasattr(os, "fork"):  # no child process to end: the size bound alone holds
            return render()
        return _in_child(render, CHAT_TEMPLATE_SECONDS, f"the chat template of {self.source}")

    def save(self, folder) -> Path:
        """Write tokenizer.json and tokenizer_config.json (HF's layout) into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
                  "eos_token": self.eos_token, "add_bos_token": self.add_bos, "chat_template": self.chat_template}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
        return folder


def _render_chat(template_text: str, source: str, messages, add_generation_prompt: bool, bos_token: str,
                 eos_token: str) -> str:
    """The chat template rendered in Jinja's immutable sandbox, its output bounded by CHAT_TEMPLATE_CHARS."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ReffuseError(f"the chat template of {source} refused the messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        template = env.from_string(template_text)
        pieces, size = [], 0
        for piece in template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                       bos_token=bos_token, eos_token=eos_token):
            size += len(piece)
            if size > CHAT_TEMPLATE_CHARS:
                raise ReffuseError(f"the chat template of {source} wrote more than {CHAT_TEMPLATE_CHARS} characters: "
                                   "it is not a usable chat format (give another tokenizer)")
            pieces.append(piece)
    except ReffuseError:
        raise
    except (jinja2.TemplateError, ArithmeticError, RecursionError, MemoryError, TypeError, ValueError) as e:
        raise ReffuseError(f"the chat template of {source} could not be rendered ({type(e).__name__}: {e}): give "
                           "another tokenizer") from None
    return "".join(pieces)


def _in_child(function, seconds: float, what: str) -> str:
    """function() -> str, computed in a forked child that is killed after `seconds`; its ReffuseError is raised
    here, with its message. `what` names the computation in the messages."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: compute, send, and leave without running the parent's clean-up
        status = 1
        try:
            os.close(read_end)
            try:
                answer = {"text": function()}
            except ReffuseError as e:
                answer = {"error": str(e)}
            except Exception as e:  # anything the sandbox let through: reported as the template's failure
                answer = {"error": f"{type(e).__name__}: {e}"}
            data = json.dumps(answer).encode("utf-8", "surrogatepass")
            view = memoryview(data)
            while view:
                view = view[os.write(write_end, view):]
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    chunks, deadline = [], time.monotonic() + seconds
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read_end], [], [], left)[0]:
                raise ReffuseError(f"{what} ran longer than {seconds:g} s: it is not a usable chat format (give "
                                   "another tokenizer)")
            chunk = os.read(read_end, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    try:
        answer = json.loads(b"".join(chunks).decode("utf-8", "surrogatepass"))
    except ValueError:
        raise ReffuseError(f"{what} ended without an answer (out of memory?): give another tokenizer") from None
    if "error" in answer:
        raise ReffuseError(answer["error"])
    return answer["text"]


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
        if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int)):
            raise ReffuseError(f"{path}: metadata tokenizer.ggml.{key} must be a token id (an integer), got "
                               f"{token_id!r}")
        return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

    chat_template = value("chat_template")
    if chat_template is not None and not isinstance(chat_template, str):
        raise ReffuseError(f"{path}: metadata tokenizer.chat_template must be text (a Jinja template), got "
                           f"{type(chat_template).__name__}")
    return Tokenizer(backend, token("bos_token_id"), token("eos_token_id"), chat_template,
                     _flag(value("ggml.add_bos_token", False), f"{path}: metadata tokenizer.ggml.add_bos_token"),
                     str(path), pre="smollm" if pre in DIGIT_SPLIT_PRE else "gpt2")


def _flag(value, where: str) -> bool:
    """A true/false setting; anything else (the string "false" among them, which is truthy) is refused."""
    if not isinstance(value, bool):
        raise ReffuseError(f"{where} must be true or false, got {value!r} ({type(value).__name__}): write it "
                           "as a boolean")
    return value


def tokenizer_from_folder(folder) -> Tokenizer:
    """The tokenizer of a model folder: tokenizer.json, plus tokenizer_config.json if present."""
    tk = require("tokenizers", "real", "tokenizing text")
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not os.path.lexists(path):
        raise ReffuseError(f"{folder} has no tokenizer.json: save one beside the model (Tokenizer.save), or "
                           "give the model's .gguf file")
    check_regular_file(path, "a tokenizer is a file tokenizer.json beside the model")
    try:
        backend = tk.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise ReffuseError(f"{path} could not be read as a tokenizer ({e})") from None
    config_path, config = folder / "tokenizer_config.json", {}
    if os.path.lexists(config_path):
        remedy = "write it again, or remove it to use the tokenizer without special tokens and chat template"
        try:
            config = read_json(config_path, remedy)
        except RecursionError:  # json nests by recursion: a hostile file can exhaust the stack
            raise ReffuseError(f"{config_path} nests its JSON values too deeply to be read: {remedy}") from None
        if not isinstance(config, dict):
            raise ReffuseError(f"{config_path} holds a {type(config).__name__}, not an object of settings: {remedy}")

    def token(key):  # HF writes a special token as a string or as {"content": ...}
        entry = config.get(key)
        content = entry.get("content") if isinstance(entry, dict) else entry
        if content is not None and not isinstance(content, str):
            raise ReffuseError(f"{config_path}: {key} must be a token (text), got {entry!r}")
        return content

    digits = '"Digits"' in backend.to_str()  # a Digits pre-tokenizer: llama.cpp's "smollm" split
    return Tokenizer(backend, token("bos_token"), token("eos_token"), _chat_template(config, config_path),
                     _flag(config.get("add_bos_token", False), f"{config_path}: add_bos_token"), str(folder),
                     pre="smollm" if digits else "gpt2")


def _chat_template(config: dict, config_path: Path) -> str | None:
    """tokenizer_config.json's chat_template: one template, or HF's list of named ones (the "default" is taken)."""
    template = config.get("chat_template")
    if isinstance(template, list) and all(isinstance(t, dict) for t in template):
        template = next((t.get("template") for t in template if t.get("name") == "default"), template)
    if template is not None and not isinstance(template, str):
        raise ReffuseError(f"{config_path}: chat_template must be a Jinja template (text), or a list of named "
                           "templates with a \"default\" one; got " + type(template).__name__)
    return template
