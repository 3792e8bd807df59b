"""Per-block activations in a documented .npz format, to hold any implementation's numerics against reffuse's.

A dump is a NumPy .npz archive written with np.savez (plain arrays only: read it with allow_pickle=False):

    format         str, 0-d       "reffuse-activations-1"
    model          str, 0-d       the model's name
    token_ids      int64 [T]      the input tokens
    hidden_states  float [L+1, T, d]  the residual stream after the token embedding (index 0) and after each
                                      block l (index l + 1), before the final norm; L = number of blocks
    logits         float [T, vocab]   next-token logits at every position

and, optionally, each block's sub-blocks (named as TransformerLens names them), so that a comparison names the
first diverging sub-block and not only the block:

    resid_mid      float [L, T, d]    block l's stream after its attention sub-block (its input where it has none)
    attn_out       float [L, T, d]    what block l's attention adds to the stream (zeros where it has none)
    mlp_out        float [L, T, d]    what block l's FFN adds to the stream (zeros where it has none)

A linear map in place of a sub-block (Nemotron-NAS) counts as that sub-block. Another implementation writes the
same keys for the same token_ids (hidden_states may be left out: then only the logits are compared), e.g. from
PyTorch:

    np.savez("theirs.npz", format="reffuse-activations-1", model="mine", token_ids=ids,
             hidden_states=np.stack([h[0].numpy() for h in hidden]), logits=logits[0].numpy())

and `reffuse verify --model M --against theirs.npz` reports the error of every block's output and of the logits.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reffuse.core.backend import to_numpy
from reffuse.errors import ReffuseError
from reffuse.outputs import write_bytes_atomic
from reffuse.records import present_fields
from reffuse.core.model import Model, check_token_ids, forward

FORMAT = "reffuse-activations-1"
SUB_BLOCKS = ("attn_out", "resid_mid", "mlp_out")  # in the order a block computes them

# The input of `reffuse verify` and `reffuse dump` when no text is given: plain prose, written for reffuse
# (so no model was trained on it), about 135 SmolLM2 tokens.
DEFAULT_TEXT = (
    "The river rose before dawn, as it did every spring, and by the time the first boats left the harbour the "
    "water had reached the steps of the old customs house. Nobody in the town was surprised. The ferrymen tied "
    "their ropes a little higher, the baker moved his flour to the upper shelves, and the children, who had been "
    "promised a holiday whenever the bridge was closed, walked down to the bank to watch the current carry "
    "branches, barrels and once, to everyone's delight, a bewildered goose past the lighthouse and out towards "
    "the sea. By noon the water began to fall, and by evening the town had quietly gone back to its work.")


@dataclass
class Activations:
    """One forward pass's numbers, as a dump holds them (the layout is in the module docstring). Arrays left out
    are None: a side with logits alone is compared on its logits."""
    token_ids: np.ndarray                      # int64 [T]
    logits: np.ndarray                         # [T, vocab]
    hidden_states: np.ndarray | None = None    # [L+1, T, d]
    attn_out: np.ndarray | None = None         # [L, T, d], like resid_mid and mlp_out (SUB_BLOCKS)
    resid_mid: np.ndarray | None = None
    mlp_out: np.ndarray | None = None
    model: str = ""                            # the model's name, as the dump gives it

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays it holds, by their names in a dump."""
        return {name: getattr(self, name) for name in ARRAYS if getattr(self, name) is not None}

    def sub_blocks(self) -> tuple[str, ...]:
        """The sub-block outputs it holds (SUB_BLOCKS' names)."""
        return tuple(name for name in SUB_BLOCKS if getattr(self, name) is not None)


ARRAYS = ("token_ids", "hidden_states", "logits", *SUB_BLOCKS)  # in the order a dump is checked


def activations(model: Model, token_ids, sub_blocks: bool = False) -> Activations:
    """token_ids, hidden_states [L+1, T, d] and logits [T, vocab] of one sequential forward pass; with
    sub_blocks, resid_mid, attn_out and mlp_out [L, T, d] too."""
    ids = check_token_ids(model, token_ids)
    hidden, mids, outputs = [], [], []
    logits = forward(model, ids, hidden_states=hidden, mids=mids if sub_blocks else None,
                     outputs=outputs if sub_blocks else None)
    result = Activations(ids, to_numpy(logits), np.stack([to_numpy(h) for h in hidden]), model=model.config.name)
    if sub_blocks:
        zeros = np.zeros_like(result.hidden_states[0])
        result.resid_mid = np.stack([to_numpy(m) for m in mids])
        result.attn_out = np.stack([zeros if a is None else to_numpy(a) for a, _ in outputs])
        result.mlp_out = np.stack([zeros if f is None else to_numpy(f) for _, f in outputs])
    return result


def save_activations(path, acts: Activations, model_name: str) -> Path:
    """Write a dump (see the module docstring) under `model_name`; returns its path."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ReffuseError(f"{path}: a dump is an .npz file; give a name ending in .npz")
    archive = io.BytesIO()
    np.savez(archive, format=np.array(FORMAT), model=np.array(model_name),
             **{name: np.asarray(array) for name, array in acts.arrays().items()})
    return write_bytes_atomic(path, archive.getvalue())


def load_activations(path) -> Activations:
    """Read and check a dump: its format tag, the keys it needs and how their shapes fit together."""
    path = Path(path)
    if not path.is_file():
        raise ReffuseError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except Exception as e:  # zipfile / numpy raise several types for files that are not npz archives
        raise ReffuseError(f"{path} could not be read as an .npz archive without pickle ({type(e).__name__}: "
                           f"{e})") from None
    if str(data.get("format", "")) != FORMAT:
        raise ReffuseError(f"{path}: format is {str(data.get('format'))!r}, expected {FORMAT!r} "
                           "(see reffuse.evaluation.activations for the layout)")
    missing = [k for k in ("token_ids", "logits") if k not in data]
    if missing:
        raise ReffuseError(f"{path} lacks {', '.join(missing)}")
    ids, logits = data["token_ids"], data["logits"]
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ReffuseError(f"{path}: token_ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    if logits.ndim != 2 or logits.shape[0] != ids.shape[0]:
        raise ReffuseError(f"{path}: logits must be [T={ids.shape[0]}, vocab], got {logits.shape}")
    hidden = data.get("hidden_states")
    if hidden is not None and (hidden.ndim != 3 or hidden.shape[1] != ids.shape[0]):
        raise ReffuseError(f"{path}: hidden_states must be [L+1, T={ids.shape[0]}, d], got {hidden.shape}")
    for key in SUB_BLOCKS:
        part = data.get(key)
        if part is not None and (part.ndim != 3 or part.shape[1] != ids.shape[0]
                                 or (hidden is not None and part.shape != (hidden.shape[0] - 1, *hidden.shape[1:]))):
            raise ReffuseError(f"{path}: {key} must be [L, T={ids.shape[0]}, d] (one row per block, as hidden_states "
                               f"has L+1), got {part.shape}")
    return Activations(**{name: data.get(name) for name in ARRAYS}, model=str(data.get("model", "")))


@dataclass(frozen=True)
class ErrorRow:
    """How far one output (the embedding, a block, a sub-block, the logits) of a candidate is from a reference's,
    computed in float64; for outputs over positions also the same without the first position (the attention
    sink, whose norm can be 10^4 times the others' and hides every other error) and the position of the largest
    error (None for other outputs)."""
    step: str                                   # which output
    max_abs: float                              # max |candidate - reference|
    max_reference: float                        # max |reference|
    relative: float                             # max_abs / max_reference
    nmse: float                                 # mean squared difference over the reference's mean square
    relative_without_sink: float | None = None  # relative, positions 1.. only
    worst_position: int | None = None

    def to_json(self) -> dict:
        return present_fields(self)

    @classmethod
    def from_json(cls, raw: dict) -> ErrorRow:
        return cls(raw["step"], raw["max_abs"], raw["max_reference"], raw["relative"], raw["nmse"],
                   raw.get("relative_without_sink"), raw.get("worst_position"))


def error_row(name: str, candidate, reference) -> ErrorRow:
    """The errors of `candidate` against `reference` (ErrorRow), computed in float64."""
    a, b = np.asarray(candidate, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    difference = np.abs(a - b)
    max_abs, scale = float(difference.max()), float(np.max(np.abs(b)))
    power = float(np.mean(b ** 2))
    relative, nmse = max_abs / scale if scale else 0.0, float(np.mean((a - b) ** 2)) / power if power else 0.0
    if a.ndim < 2 or a.shape[0] < 2:
        return ErrorRow(name, max_abs, scale, relative, nmse)
    rest_abs, rest_scale = float(difference[1:].max()), float(np.max(np.abs(b[1:])))
    return ErrorRow(name, max_abs, scale, relative, nmse, rest_abs / rest_scale if rest_scale else 0.0,
                    int(np.unravel_index(difference.argmax(), difference.shape)[0]))


@dataclass(frozen=True)
class Comparison:
    """Per-output errors of a candidate against a reference (compare), and how often their argmax agrees."""
    hidden_states: tuple[ErrorRow, ...]  # the embedding, then per block its sub-blocks (where both sides have
                                         # them) and its output; none where a side has no hidden states
    logits: ErrorRow
    top1_agreement: float                # fraction of positions whose argmax agrees

    def outputs(self) -> tuple[ErrorRow, ...]:
        """Every output compared, in the order the model computes them: the hidden states, then the logits."""
        return self.hidden_states + (self.logits,)

    def to_json(self) -> dict:
        return {"hidden_states": [row.to_json() for row in self.hidden_states], "logits": self.logits.to_json(),
                "top1_agreement": self.top1_agreement}

    @classmethod
    def from_json(cls, raw: dict) -> Comparison:
        return cls(tuple(ErrorRow.from_json(row) for row in raw["hidden_states"]), ErrorRow.from_json(raw["logits"]),
                   raw["top1_agreement"])


def compare(candidate: Activations, reference: Activations, sides=("candidate", "reference"),
            block_names=None) -> Comparison:
    """Per-step errors of candidate against reference (as activations / load_activations return them).
    `sides` names the two in messages; block_names labels the blocks (default "block i").
    """
    if not np.array_equal(candidate.token_ids, reference.token_ids):
        raise ReffuseError(f"{sides[0]} and {sides[1]} ran on different token ids")
    if candidate.logits.shape != reference.logits.shape:
        raise ReffuseError(f"logits shapes differ: {sides[0]} has {candidate.logits.shape} [tokens, vocabulary], "
                           f"{sides[1]} {reference.logits.shape}")
    rows = []
    ours, theirs = candidate.hidden_states, reference.hidden_states
    if ours is not None and theirs is not None:
        if ours.shape != theirs.shape:
            raise ReffuseError(f"hidden_states shapes differ: {sides[0]} has {ours.shape}, {sides[1]} {theirs.shape} "
                               "(steps = 1 + number of blocks, tokens, width)")
        names = block_names or [f"block {i}" for i in range(len(ours) - 1)]
        parts = [k for k in candidate.sub_blocks() if k in reference.sub_blocks()]
        rows = [error_row("embedding", ours[0], theirs[0])]
        for i, name in enumerate(names):
            rows += [error_row(f"{name} {k}", getattr(candidate, k)[i], getattr(reference, k)[i]) for k in parts]
            rows.append(error_row(name, ours[i + 1], theirs[i + 1]))
    agreement = float(np.mean(candidate.logits.argmax(-1) == reference.logits.argmax(-1)))
    return Comparison(tuple(rows), error_row("logits", candidate.logits, reference.logits), agreement)
