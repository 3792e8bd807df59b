"""reffuse's numerics against another implementation, block by block: transformers on the same weights,
llama.cpp on the model exported as an F32 GGUF, or a dump in reffuse's activation format written by any
implementation (`reffuse verify` prints this)."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass

import numpy as np

from reffuse.core.backend import to_numpy
from reffuse.core.generate import generate
from reffuse.core.layout import format_layers
from reffuse.errors import ReffuseError
from reffuse.files import check_regular_file
from reffuse.evaluation.activations import Activations, Comparison, ErrorRow, activations, compare, load_activations
from reffuse.formats.registry import load_model
from reffuse.records import FlatRecord

# What "agrees" means, per precision of the less precise side, relative to the largest value of each output
# (every block's and the logits'). float32: roundings accumulated over 30 blocks, measured ~1e-4 absolute (3e-6
# relative) on SmolLM2's logits and within 8e-6 on its blocks; float64 leaves ~1e-13, so 1e-9 is a wide margin.
TARGETS = {"float32": {"relative": 1e-5, "logits_max_abs": 2e-4}, "float64": {"relative": 1e-9},
           # llama.cpp: its own kernels, other summation orders and its own RoPE, on the same F32 weights
           "llama.cpp": {"relative": 1e-4}}


@dataclass(frozen=True)
class Judgement:
    """Every output held against its target, and the first that misses it."""
    checks: dict[str, bool]        # each target, in words -> met
    first_diverging: str | None    # the first output (in the order computed) that misses its target


def judge(comparison: Comparison, precision: str, rtol: float | None = None, atol: float | None = None) -> Judgement:
    """Every output against its target (the embedding, each block, the logits). rtol replaces the relative
    target, atol adds a bound on the largest difference."""
    relative = TARGETS[precision]["relative"] if rtol is None else rtol
    checks, first = {}, None
    for row in comparison.outputs():
        met = row.relative <= relative and (atol is None or row.max_abs <= atol)
        checks[f"{row.step}: relative <= {relative:g}" + (f", max |diff| <= {atol:g}" if atol else "")] = met
        if not met and first is None:
            first = row.step
    logits_abs = TARGETS[precision].get("logits_max_abs") if atol is None and rtol is None else None
    if logits_abs is not None:
        checks[f"logits max |diff| <= {logits_abs:g}"] = comparison.logits.max_abs <= logits_abs
    return Judgement(checks, first)


DUMP_DTYPES = ("float16", "float32", "float64")  # real floats: a complex or integer dump is not activations


def check_dump_path(path) -> None:
    """Refuse, before any work, what cannot be a dump: no file, not a regular file, not an .npz archive."""
    remedy = ("give transformers, llama.cpp, or a dump in reffuse's activation format (an .npz archive; "
              "`reffuse dump` writes one, reffuse.evaluation.activations documents it)")
    check_regular_file(path, remedy)
    if not zipfile.is_zipfile(path):
        raise ReffuseError(f"--against {path} is not an .npz archive: {remedy}")


def check_dump(dump: Activations, source: str) -> None:
    """Refuse a dump whose activations are not real floating-point numbers (a complex dump would be compared by
    its real part alone, an integer one was rounded)."""
    for key, array in dump.arrays().items():
        if key != "token_ids" and array.dtype.name not in DUMP_DTYPES:
            raise ReffuseError(f"{source}: {key} has dtype {array.dtype}; a dump holds real floating-point "
                               f"activations ({', '.join(DUMP_DTYPES)}): write them as such")


def check_convention(model, dump: Activations, ours: Activations, source: str) -> None:
    """Refuse a dump whose last hidden state is HF's (taken after the final norm) rather than the stream."""
    theirs, stream = dump.hidden_states, ours.hidden_states
    if theirs is None or theirs.shape != stream.shape:
        return
    from reffuse.core.model import rms_norm
    normed = to_numpy(rms_norm(stream[-1], to_numpy(model.norm_gain), model.config.norm_eps))
    after_norm, before_norm = np.abs(theirs[-1] - normed).max(), np.abs(theirs[-1] - stream[-1]).max()
    if after_norm < 1e-3 * before_norm:
        raise ReffuseError(f"{source}: its last hidden state is the stream after the final norm (HF's "
                           "hidden_states[-1]), not the last block's output: write the stream before the norm, as "
                           "the format says (reffuse.evaluation.activations)")


def block_names(model) -> list[str]:
    """"block i" for each block; a fused block says which layers it was fused from."""
    return [f"block {i}" + (f" (fused from layers {format_layers(b.fused_from)})" if b.fused_from else "")
            for i, b in enumerate(model.layout().blocks)]


def check_dump_fits(model, dump: Activations, model_name: str, source: str) -> None:
    """Refuse a dump made with a model of other shapes, saying which side is which and which --model fits."""
    vocab, dim, blocks = model.config.vocab_size, model.config.dim, len(model.blocks)
    theirs = {"vocabulary": dump.logits.shape[1]}
    if dump.hidden_states is not None:
        theirs |= {"blocks": dump.hidden_states.shape[0] - 1, "width": dump.hidden_states.shape[2]}
    ours = {"vocabulary": vocab, "blocks": blocks, "width": dim}
    differ = [k for k in theirs if theirs[k] != ours[k]]
    if differ:
        made_with = f"; the dump names its model {dump.model!r}" if dump.model else ""
        raise ReffuseError(f"{source} (the dump) has {', '.join(f'{theirs[k]} {k}' for k in differ)}, but "
                           f"{model_name} (--model, reffuse's side) has {', '.join(f'{ours[k]} {k}' for k in differ)}: "
                           f"give --model the model the dump was made with{made_with}")


def precision_hint(comparison: Comparison, precision: str, dump: Activations) -> str | None:
    """A likely cause when a float64 dump misses float64's targets by float32's rounding."""
    if precision != "float64":
        return None
    failing = [r.relative for r in comparison.outputs() if r.relative > TARGETS["float64"]["relative"]]
    if failing and max(failing) < 1e-4:
        return (f"the dump is {dump.logits.dtype} but misses float64's target by float32's rounding (worst "
                f"{max(failing):.1e}): some step that wrote it ran in float32 (a float32 weight or constant keeps "
                "float32's rounding even when the result is stored as float64); compute every step in float64, or "
                "compare in float32 (--dtype float32 and a float32 dump)")
    return None


@dataclass(frozen=True)
class GreedyComparison(FlatRecord):
    """reffuse's greedy continuation beside another implementation's, and how long they agree."""
    tokens: int             # generated by each
    identical_prefix: int   # ids identical before the first difference
    reffuse: list[int]
    reference: list[int]


def greedy_comparison(model, ids, theirs: list[int]) -> GreedyComparison:
    ours = generate(model, ids, len(theirs))
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
    return GreedyComparison(len(theirs), same, ours, theirs)


@dataclass(frozen=True)
class QuantizedGap:
    """llama.cpp on a published quantized file against reffuse's float32 logits: quantization's gap, reported
    and not judged."""
    logits: ErrorRow
    top1_agreement: float
    file: str               # the quantized file's name

    def to_json(self) -> dict:
        return self.logits.to_json() | {"top1_agreement": self.top1_agreement, "file": self.file, "judged": False}

    @classmethod
    def from_json(cls, raw: dict) -> QuantizedGap:
        return cls(ErrorRow.from_json(raw), raw["top1_agreement"], raw["file"])


@dataclass(frozen=True)
class VerifyResult:
    """What `reffuse verify` found (its --json prints this): every output's error against the other
    implementation, the greedy continuations, and each target met or not."""
    comparison: Comparison
    model: str                                  # the model's config name
    against: str                                # the other implementation, in words
    dtype: str
    tokens: int
    targets: str                                # whose targets apply: a key of TARGETS
    targets_met: dict[str, bool]                # each target, in words -> met
    first_diverging: str | None                 # the first output that misses its target
    greedy: GreedyComparison | None = None      # against transformers and llama.cpp
    quantized_file: QuantizedGap | None = None  # against llama.cpp on smollm2: its published quantized file
    hint: str | None = None                     # against a dump: a likely cause of missed targets

    @property
    def met(self) -> bool:
        return all(self.targets_met.values())

    def to_json(self) -> dict:
        raw = self.comparison.to_json()
        for name, part in (("greedy", self.greedy), ("quantized_file", self.quantized_file)):
            if part is not None:
                raw[name] = part.to_json()
        if self.hint is not None:
            raw["hint"] = self.hint
        return raw | {"model": self.model, "against": self.against, "dtype": self.dtype, "tokens": self.tokens,
                      "targets": self.targets, "targets_met": self.targets_met,
                      "first_diverging": self.first_diverging}

    @classmethod
    def from_json(cls, raw: dict) -> VerifyResult:
        greedy, quantized = raw.get("greedy"), raw.get("quantized_file")
        return cls(Comparison.from_json(raw), raw["model"], raw["against"], raw["dtype"], raw["tokens"],
                   raw["targets"], raw["targets_met"], raw["first_diverging"],
                   None if greedy is None else GreedyComparison.from_json(greedy),
                   None if quantized is None else QuantizedGap.from_json(quantized), raw.get("hint"))


def verify(model_name: str, against: str, ids=None, dtype: str = "float32", generate_tokens: int = 32,
           rtol: float | None = None, atol: float | None = None, tokenizer: str | None = None) -> VerifyResult:
    """Compare `model_name` with `against` ("transformers", "llama.cpp", or the path of an activation dump) on the
    token `ids` (a dump brings its own): per-block and logit differences (llama.cpp gives logits only), top-1
    agreement, with transformers and llama.cpp the greedy continuation too, and every output judged against the
    target of TARGETS for the comparison's precision (or rtol / atol). A float64 dump is compared in float64;
    llama.cpp runs the model exported as an F32 GGUF, with `tokenizer` (default: the model's) written into it."""
    greedy = quantized = hint = None
    if against == "transformers":
        from reffuse.evaluation.reference import load_reference, reference_activations, reference_greedy
        model = load_model(model_name, dtype=dtype)
        reference_model = load_reference(model_name, dtype=dtype)
        comparison = compare(activations(model, ids), reference_activations(reference_model, ids))
        greedy = greedy_comparison(model, ids, reference_greedy(reference_model, ids, generate_tokens))
        description = "transformers (LlamaForCausalLM)"
        precision = "float32"  # transformers' norms, softmax and RoPE tables are float32 in any dtype
    elif against == "llama.cpp":
        from reffuse.evaluation.llamacpp import LlamaCpp, run_llamacpp
        from reffuse.formats.fetch import fetch
        from reffuse.formats.registry import find_tokenizer
        if dtype != "float32":
            raise ReffuseError("llama.cpp runs the F32 export: verify against it in float32")
        model = load_model(model_name, dtype="float32")
        try:  # token ids need no tokenizer: without one the export says so and llama.cpp reads ids only
            vocabulary = find_tokenizer(tokenizer or model_name)
        except ReffuseError:
            if tokenizer is not None:
                raise
            vocabulary = None
        logits, theirs, architecture = run_llamacpp(model, vocabulary, ids, generate_tokens)
        ours = activations(model, ids)
        comparison = compare(ours, Activations(ours.token_ids, logits))
        greedy = greedy_comparison(model, ids, theirs)
        description = f"llama.cpp (llama-cpp-python, the model exported as an F32 GGUF, architecture {architecture})"
        if model_name == "smollm2":  # the published Q4_1 file too: llama.cpp's quantized kernels, a gap apart
            published = fetch("smollm2")
            gap = compare(Activations(ours.token_ids, LlamaCpp(published, n_ctx=max(64, len(ids) + 8)).logits(ids)),
                          ours)
            quantized = QuantizedGap(gap.logits, gap.top1_agreement, published.name)
        precision, dtype = "llama.cpp", "float32"
    else:
        check_dump_path(against)
        dump = load_activations(against)
        check_dump(dump, against)
        if dump.logits.dtype == np.float64:
            dtype = "float64"  # the other side computed in float64: so does reffuse
        model = load_model(model_name, dtype=dtype)
        check_dump_fits(model, dump, model_name, against)
        limit = model.config.max_positions
        if limit is not None and dump.token_ids.size > limit:
            raise ReffuseError(f"{against}: its {dump.token_ids.size} token ids are past the context length of "
                               f"{model_name}, {limit}: dump at most {limit} tokens")
        ours = activations(model, dump.token_ids, sub_blocks=bool(dump.sub_blocks()))
        check_convention(model, dump, ours, against)
        comparison = compare(dump, ours, sides=(f"{against} (the dump)", f"{model_name} (reffuse)"),
                             block_names=block_names(model))
        ids, description = dump.token_ids, f"{against} (model {dump.model or '?'}; reffuse is the reference)"
        precision = "float64" if dtype == "float64" and dump.logits.dtype == np.float64 else "float32"
        hint = precision_hint(comparison, precision, dump)

    judged = judge(comparison, precision, rtol, atol)
    checks = judged.checks
    if greedy is not None:
        checks[f"greedy ids identical for {generate_tokens} tokens"] = greedy.identical_prefix == generate_tokens
    return VerifyResult(comparison, model.config.name, description, dtype, len(ids), precision, checks,
                        judged.first_diverging, greedy, quantized, hint)
