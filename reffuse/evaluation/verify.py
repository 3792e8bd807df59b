"""reffuse's numerics against another implementation, block by block: transformers on the same weights,
llama.cpp on the model exported as an F32 GGUF, or a dump in reffuse's activation format written by any
implementation (`reffuse verify` prints this)."""

from __future__ import annotations

import numpy as np

from reffuse.core.backend import to_numpy
from reffuse.core.generate import generate
from reffuse.errors import ReffuseError
from reffuse.evaluation.activations import activations, compare, load_activations
from reffuse.formats.registry import load_model

# What "agrees" means, per precision of the less precise side, relative to the largest value of each output
# (every block's and the logits'). float32: roundings accumulated over 30 blocks, measured ~1e-4 absolute (3e-6
# relative) on SmolLM2's logits and within 8e-6 on its blocks; float64 leaves ~1e-13, so 1e-9 is a wide margin.
TARGETS = {"float32": {"relative": 1e-5, "logits_max_abs": 2e-4}, "float64": {"relative": 1e-9},
           # llama.cpp: its own kernels, other summation orders and its own RoPE, on the same F32 weights
           "llama.cpp": {"relative": 1e-4}}


def judge(result: dict, precision: str, rtol: float | None = None, atol: float | None = None) -> dict:
    """Every output against its target (the embedding, each block, the logits): {check: met}, and the first
    diverging output named. rtol replaces the relative target, atol adds a bound on the largest difference."""
    relative = TARGETS[precision]["relative"] if rtol is None else rtol
    checks, first = {}, None
    for row in result["hidden_states"] + [result["logits"]]:
        met = row["relative"] <= relative and (atol is None or row["max_abs"] <= atol)
        checks[f"{row['step']}: relative <= {relative:g}" + (f", max |diff| <= {atol:g}" if atol else "")] = met
        if not met and first is None:
            first = row["step"]
    logits_abs = TARGETS[precision].get("logits_max_abs") if atol is None and rtol is None else None
    if logits_abs is not None:
        checks[f"logits max |diff| <= {logits_abs:g}"] = result["logits"]["max_abs"] <= logits_abs
    return {"checks": checks, "first_diverging": first}


def check_convention(model, dump: dict, ours: dict, source: str) -> None:
    """Refuse a dump whose last hidden state is HF's (taken after the final norm) rather than the stream."""
    theirs, stream = dump.get("hidden_states"), ours["hidden_states"]
    if theirs is None or theirs.shape != stream.shape:
        return
    from reffuse.core.model import rms_norm
    normed = to_numpy(rms_norm(stream[-1], to_numpy(model.norm_gain), model.config.norm_eps))
    after_norm, before_norm = np.abs(theirs[-1] - normed).max(), np.abs(theirs[-1] - stream[-1]).max()
    if after_norm < 1e-3 * before_norm:
        raise ReffuseError(f"{source}: its last hidden state is the stream after the final norm (HF's "
                           "hidden_states[-1]), not the last block's output: write the stream before the norm, as "
                           "the format says (reffuse.evaluation.activations)")


def greedy_comparison(model, ids, theirs: list[int]) -> dict:
    """reffuse's greedy continuation of `ids` beside another implementation's, and how long they agree."""
    ours = generate(model, ids, len(theirs))
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
    return {"tokens": len(theirs), "identical_prefix": same, "reffuse": ours, "reference": theirs}


def verify(model_name: str, against: str, ids=None, dtype: str = "float32", generate_tokens: int = 32,
           rtol: float | None = None, atol: float | None = None, tokenizer: str | None = None) -> dict:
    """Compare `model_name` with `against` ("transformers", "llama.cpp", or the path of an activation dump) on the
    token `ids` (a dump brings its own): per-block and logit differences (llama.cpp gives logits only), top-1
    agreement, with transformers and llama.cpp the greedy continuation too, and every output judged against the
    target of TARGETS for the comparison's precision (or rtol / atol). A float64 dump is compared in float64;
    llama.cpp runs the model exported as an F32 GGUF, with `tokenizer` (default: the model's) written into it."""
    if against == "transformers":
        from reffuse.evaluation.reference import load_reference, reference_activations, reference_greedy
        model = load_model(model_name, dtype=dtype)
        reference_model = load_reference(model_name, dtype=dtype)
        result = compare(activations(model, ids), reference_activations(reference_model, ids))
        result["greedy"] = greedy_comparison(model, ids, reference_greedy(reference_model, ids, generate_tokens))
        description = "transformers (LlamaForCausalLM)"
        precision = "float32"  # transformers' norms, softmax and RoPE tables are float32 in any dtype
    elif against == "llama.cpp":
        from reffuse.evaluation.llamacpp import LlamaCpp, run_llamacpp
        from reffuse.formats.fetch import fetch
        from reffuse.formats.registry import find_tokenizer
        if dtype != "float32":
            raise ReffuseError("llama.cpp runs the F32 export: verify against it in float32")
        model = load_model(model_name, dtype="float32")
        logits, theirs, architecture = run_llamacpp(model, find_tokenizer(tokenizer or model_name), ids,
                                                    generate_tokens)
        ours = {"token_ids": np.asarray(ids), "logits": activations(model, ids)["logits"]}
        result = compare(ours, {"token_ids": ours["token_ids"], "logits": logits})
        result["greedy"] = greedy_comparison(model, ids, theirs)
        description = f"llama.cpp (llama-cpp-python, the model exported as an F32 GGUF, architecture {architecture})"
        if model_name == "smollm2":  # the published Q4_1 file too: llama.cpp's quantized kernels, a gap apart
            quantized = LlamaCpp(fetch("smollm2"), n_ctx=max(64, len(ids) + 8)).logits(ids)
            gap = compare({"token_ids": ours["token_ids"], "logits": quantized}, ours)
            result["quantized_file"] = gap["logits"] | {"top1_agreement": gap["top1_agreement"],
                                                        "file": fetch("smollm2").name, "judged": False}
        precision, dtype = "llama.cpp", "float32"
    else:
        dump = load_activations(against)
        if dump["logits"].dtype == np.float64:
            dtype = "float64"  # the other side computed in float64: so does reffuse
        model = load_model(model_name, dtype=dtype)
        ours = activations(model, dump["token_ids"])
        check_convention(model, dump, ours, against)
        result = compare(dump, ours)
        ids, description = dump["token_ids"], f"{against} (model {dump['model'] or '?'}; reffuse is the reference)"
        precision = "float64" if dtype == "float64" and dump["logits"].dtype == np.float64 else "float32"

    judged = judge(result, precision, rtol, atol)
    checks = judged["checks"]
    if "greedy" in result:
        checks[f"greedy ids identical for {generate_tokens} tokens"] = \
            result["greedy"]["identical_prefix"] == generate_tokens
    result.update({"model": model.config.name, "against": description, "dtype": dtype, "tokens": len(ids),
                   "targets": precision, "targets_met": checks, "first_diverging": judged["first_diverging"]})
    return result
