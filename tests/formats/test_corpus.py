"""The Shakespeare corpus: the fixed split, token windows and the spans they record."""

import numpy as np
import pytest

from reffuse.formats.corpus import (CALIBRATION, HELD_OUT, TITLES, TRAINING, Span, corpus_folder, held_out_windows,
                                    play_text, shares, split_texts, token_windows, training_windows, windows)
from reffuse.errors import ReffuseError


class CharTokenizer:
    """One token per character: spans are easy to check by hand."""
    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def texts(*strings):
    return [(s, Span(f"text{i}", f"Text {i}", 0, len(s))) for i, s in enumerate(strings)]


@pytest.fixture(scope="module")
def corpus():
    return corpus_folder()


def long_lines(text, length=40):
    """Lines long enough to be one play's own (short ones like "Exeunt." recur in every play)."""
    return {line.strip() for line in text.splitlines() if len(line.strip()) >= length}


def test_windows_are_the_first_tokens_without_overlap():
    ids = np.arange(100)
    w = windows(ids, 16, 70)
    assert w.shape == (4, 16) and w.dtype == np.int64  # 70 // 16 = 4 windows; the remainder is left out
    np.testing.assert_array_equal(w.ravel(), np.arange(64))


@pytest.mark.parametrize("ids, window, n_tokens, message", [
    (np.arange(10), 16, 10, "do not fill one window"),
    (np.arange(10), 4, 12, "has only 10"),
    ([], 4, 4, "has only 0"),
    (np.arange(10), 1, 10, "nothing to predict"),
    (np.zeros((2, 8), dtype=int), 4, 8, "1-D"),
    (np.linspace(0, 1, 8), 4, 8, "integers"),
])
def test_bad_windows(ids, window, n_tokens, message):
    with pytest.raises(ReffuseError, match=message):
        windows(ids, window, n_tokens)


def test_token_windows_take_texts_in_order_and_never_cross_them():
    got = token_windows(texts("abcdefghij", "0123456789xyz"), CharTokenizer(), window=4, n_tokens=16)
    assert [CharTokenizer().decode(w) for w in got.ids] == ["abcd", "efgh", "0123", "4567"]
    assert got.spans == (Span("text0", "Text 0", 0, 8, 8), Span("text1", "Text 1", 0, 8, 8))
    assert got.describe().tokens == 16 and got.window == 4 and len(got) == 4


def test_token_windows_stop_at_the_last_text_needed():
    got = token_windows(texts("abcdefgh", "ijkl"), CharTokenizer(), window=4, n_tokens=8)
    assert [s.play for s in got.spans] == ["text0"]


def test_token_windows_errors():
    with pytest.raises(ReffuseError, match="gives only 8 tokens"):
        token_windows(texts("abcdefghij"), CharTokenizer(), window=4, n_tokens=12)
    with pytest.raises(ReffuseError, match="empty"):
        token_windows(texts(""), CharTokenizer(), window=4, n_tokens=4)
    with pytest.raises(ReffuseError, match="do not fill one window"):
        token_windows(texts("abcdefgh"), CharTokenizer(), window=16, n_tokens=8)


def test_lossy_tokenizer_cannot_locate_spans():
    class Lowercasing(CharTokenizer):
        def encode(self, text):
            return super().encode(text.lower())

    with pytest.raises(ReffuseError, match="cannot locate spans"):
        token_windows(texts("ABCDEFGH"), Lowercasing(), window=4, n_tokens=8)


def test_split_is_fixed_and_disjoint_by_name():
    assert not set(HELD_OUT) & set(CALIBRATION) and not set(TRAINING) & (set(HELD_OUT) | set(CALIBRATION))
    assert set(TITLES) == set(HELD_OUT) | set(CALIBRATION) | set(TRAINING) and len(TRAINING) == 27
    # every First Folio edition (*_gut_f) is left out: hamlet_gut_f is the held-out play again
    assert not [p for p in HELD_OUT + CALIBRATION + TRAINING if p.endswith("_f")]


def test_calibration_training_and_held_out_share_no_text(corpus):
    held_out = set().union(*(long_lines(t) for t, _ in split_texts("held-out", corpus)))
    calibration = set().union(*(long_lines(t) for t, _ in split_texts("calibration", corpus)))
    training = set().union(*(long_lines(t) for t, _ in split_texts("training", corpus)))
    assert len(held_out) > 2000 and len(calibration) > 8000 and len(training) > 30000
    assert not held_out & calibration and not held_out & training and not calibration & training
    # the check has teeth: the Folio Hamlet, left out of the split, shares lines with the held-out Hamlet
    assert held_out & long_lines(play_text("hamlet_gut_f", corpus))


def test_held_out_windows_are_dealt_over_the_texts_from_their_first_scene(corpus):
    got = held_out_windows(CharTokenizer(), window=100, n_tokens=1050, folder=corpus)  # 10 windows over 9 texts
    assert [s.play for s in got.spans] == list(HELD_OUT) and [s.tokens for s in got.spans] == [200] + [100] * 8
    assert [s.kind for s in got.spans] == ["drama"] * 8 + ["verse"]
    counts = [s.tokens // 100 for s in got.spans]                  # windows per text, in order
    decoded = ["".join(CharTokenizer().decode(w) for w in got.ids[i:i + n])
               for i, n in zip(np.cumsum([0] + counts), counts)]
    for span, text in zip(got.spans, decoded):
        full = play_text(span.play, corpus)
        assert text == full[span.start:span.end] and span.end - span.start == span.tokens
        # the title page and the list of persons are left out: a play starts at its first scene
        assert text.lower().startswith("scene i") if span.kind == "drama" else text.startswith("I\n")
    assert "Persons Represented".lower() not in "".join(decoded).lower()
    assert shares(64, 9) == [8] + [7] * 8 and shares(8, 9) == [1] * 8 + [0]


def test_training_windows_take_every_text_in_turn_and_all_when_the_budget_is_larger(corpus):
    got = training_windows(CharTokenizer(), window=1000, n_tokens=30_000, folder=corpus)
    assert [s.play for s in got.spans] == list(TRAINING[:len(got.spans)]) and len(got) == 30
    assert got.spans[0].tokens == 2000 and "".join(CharTokenizer().decode(got.ids[0])) == \
        play_text(TRAINING[0], corpus)[:1000]
    everything = training_windows(CharTokenizer(), window=100_000, n_tokens=10 ** 8, folder=corpus)
    assert len(everything) == sum(len(play_text(p, corpus)) // 100_000 for p in TRAINING) < 1000


def test_missing_play_is_a_clear_error(tmp_path):
    with pytest.raises(ReffuseError, match="reffuse fetch shakespeare"):
        play_text("hamlet_gut", tmp_path)
    (tmp_path / "hamlet_gut.txt").write_text("  \n")
    with pytest.raises(ReffuseError, match="is empty"):
        play_text("hamlet_gut", tmp_path)
    with pytest.raises(ReffuseError, match="unknown split"):
        split_texts("test", tmp_path)
