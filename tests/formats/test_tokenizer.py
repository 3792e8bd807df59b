"""SmolLM2's tokenizer rebuilt from its GGUF: round trips, special tokens, digits, the chat format, saving,
streaming, bad input, and the same ids as transformers' tokenizer."""

import numpy as np
import pytest

from reffuse.errors import ReffuseError
from reffuse.formats.registry import load_tokenizer
from reffuse.formats.tokenizer import StreamDecoder, Tokenizer

PASSAGE = ("HAMLET. To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
           "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles,\n"
           "And by opposing end them? To die: to sleep; No more; and by a sleep to say we end\n"
           "The heart-ache and the thousand natural shocks  That flesh is heir to, 'tis a consummation\n\n"
           "Devoutly to be wish'd.  Naïve café, “quoted”, 東京 — and <odd> markup & tabs\there.")


def test_round_trip(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode(PASSAGE)
    assert smollm2_tokenizer.decode(ids) == PASSAGE
    assert all(0 <= i < smollm2_tokenizer.vocab_size == 49152 for i in ids)


def test_known_ids(smollm2_tokenizer):
    assert smollm2_tokenizer.encode("The capital of France is") == [504, 3575, 282, 4649, 314]


def test_special_tokens(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.special_tokens["<|im_start|>"] == 1 and tok.special_tokens["<|im_end|>"] == 2
    assert (tok.bos_token, tok.eos_token, tok.eos_id) == ("<|im_start|>", "<|im_end|>", 2)
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2  # written in text, a special token is one id
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHi"


def test_digits_are_split_one_by_one(smollm2_tokenizer):
    # llama.cpp's "smollm" pre-tokenizer (and SmolLM2's own tokenizer.json): digits split before GPT-2's pattern
    tok = smollm2_tokenizer
    pieces = [tok.decode([i]) for i in tok.encode("In 2024, 17 ships")]
    assert pieces[1:6] == [" ", "2", "0", "2", "4"]


def test_chat_format(smollm2_tokenizer):
    assert smollm2_tokenizer.chat_prompt("What is 2+2?") == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")  # the GGUF's own template
    no_template = Tokenizer(smollm2_tokenizer.backend, "<|im_start|>", "<|im_end|>", None, False, "test")
    assert no_template.chat_prompt([{"role": "user", "content": "Hi"}]) == \
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_save_and_load_from_a_folder(smollm2_tokenizer, tmp_path):
    smollm2_tokenizer.save(tmp_path / "model")
    loaded = load_tokenizer(tmp_path / "model")
    assert loaded.encode(PASSAGE) == smollm2_tokenizer.encode(PASSAGE)
    assert loaded.chat_prompt("Hi") == smollm2_tokenizer.chat_prompt("Hi")
    assert (loaded.eos_id, loaded.add_bos) == (smollm2_tokenizer.eos_id, smollm2_tokenizer.add_bos)


def test_streaming_holds_back_incomplete_characters(smollm2_tokenizer):
    text = "東京 and 😀!"
    stream = StreamDecoder(smollm2_tokenizer)
    pieces = [stream.add(i) for i in smollm2_tokenizer.encode(text)]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_bad_input(smollm2_tokenizer, tmp_path):
    with pytest.raises(ReffuseError, match="the text to encode is empty"):
        smollm2_tokenizer.encode("")
    with pytest.raises(ReffuseError, match="must be a string"):
        smollm2_tokenizer.encode(None)
    with pytest.raises(ReffuseError, match=r"token id 49152 is out of range for the vocabulary of 49152"):
        smollm2_tokenizer.decode([1, 49152])
    with pytest.raises(ReffuseError, match="has no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ReffuseError, match="'tiny' is synthetic and has no tokenizer"):
        load_tokenizer("tiny")
    with pytest.raises(ReffuseError, match="non-empty content"):
        smollm2_tokenizer.chat_prompt("")


def test_same_ids_as_transformers(smollm2_tokenizer):
    transformers = pytest.importorskip("transformers")
    from reffuse.formats.fetch import fetch
    gguf_path = fetch("smollm2")
    theirs = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # A passage without digits: transformers' GGUF conversion leaves out the "smollm" digit split (above)
    assert smollm2_tokenizer.encode(PASSAGE) == theirs.encode(PASSAGE, add_special_tokens=False)
    assert smollm2_tokenizer.chat_prompt("Hi") == theirs.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)


def test_a_tokenizer_of_another_vocabulary_size_is_refused_either_way(tiny32):
    from types import SimpleNamespace

    from reffuse.formats.registry import check_tokenizer
    for size in (tiny32.config.vocab_size - 1, tiny32.config.vocab_size + 1):
        with pytest.raises(ReffuseError, match=f"has {size} tokens but the model tiny has 256"):
            check_tokenizer(SimpleNamespace(vocab_size=size, source="a test"), tiny32, "tiny")
    check_tokenizer(SimpleNamespace(vocab_size=256, source="a test"), tiny32, "tiny")


@pytest.mark.parametrize("template, message", [  # the time limit: tests/test_inputs.py
    ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "wrote more than 1000000 characters"),
    ("{% for m in messages %}{{ m.content", "could not be rendered \\(TemplateSyntaxError"),
    ("{{ ''.__class__.__mro__ }}", "could not be rendered \\(SecurityError"),
])
def test_chat_templates_are_bounded_and_their_errors_are_one_line(template, message):
    from reffuse.formats.tokenizer import Tokenizer
    tokenizer = Tokenizer(None, None, None, template, False, "a test template")
    with pytest.raises(ReffuseError, match=f"the chat template of a test template .*{message}"):
        tokenizer.chat_prompt("hello")


def gguf_with_tokenizer(path, tokens, merges, chat_template="{{ messages[0].content }}"):
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_chat_template(chat_template)
    writer.add_tensor("dummy", np.zeros(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_merges_that_name_unknown_tokens_are_refused(tmp_path):
    from reffuse.formats.tokenizer import tokenizer_from_gguf
    path = gguf_with_tokenizer(tmp_path / "t.gguf", ["a", "b", "ab"], ["a b", "a z"])
    with pytest.raises(ReffuseError, match=r"merges entry 1 \('a z'\) names a token that is not in "
                                           "tokenizer.ggml.tokens"):
        tokenizer_from_gguf(path)


def test_gguf_text_that_is_not_utf8_is_named(tmp_path):
    from reffuse.formats.tokenizer import tokenizer_from_gguf
    path = gguf_with_tokenizer(tmp_path / "t.gguf", ["a", "b", "ab"], ["a b"], chat_template="{{ CHATTEMPLATE }}")
    data = path.read_bytes()
    path.write_bytes(data.replace(b"CHATTEMPLATE", b"CHAT\xff\xfeMPLATE"))
    with pytest.raises(ReffuseError, match="metadata tokenizer.chat_template is not valid UTF-8 text"):
        tokenizer_from_gguf(path)
