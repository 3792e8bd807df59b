"""reffuse's numerics against another implementation, block by block: transformers on the same weights, or a
dump in reffuse's activation format written by any implementation (`reffuse verify` prints this)."""

from __future__ import annotations

import numpy as np

from reffuse.core.generate import generate
from reffuse.evaluation.activations import activations, compare, load_activations
from reffuse.formats.registry import load_model

# What "agrees" means, per precision of the less precise side. float32: roundings accumulated over 30 blocks,
# measured ~1e-4 absolute (3e-6 relative) on SmolLM2; float64 leaves ~1e-13 relative, so 1e-9 is a wide margin.
TARGETS = {"float32": {"logits_max_abs": 2e-4, "logits_relative": 1e-5},
           "float64": {"logits_relative": 1e-9}}


def verify(model_name: str, against: str, ids=None, dtype: str = "float32", generate_tokens: int = 32) -> dict:
    """Compare `model_name` with `against` ("transformers", or the path of an activation dump) on the token `ids`
    (a dump brings its own): per-block and logit differences, top-1 agreement, with transformers the greedy
    continuation too, and each target of TARGETS for the comparison's precision, met or not."""
    if against == "transformers":
        from reffuse.evaluation.reference import load_reference, reference_activations, reference_greedy
        model = load_model(model_name, dtype=dtype)
        reference_model = load_reference(model_name, dtype=dtype)
        result = compare(activations(model, ids), reference_activations(reference_model, ids))
        ours = generate(model, ids, generate_tokens)
        theirs = reference_greedy(reference_model, ids, generate_tokens)
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
        result["greedy"] = {"tokens": generate_tokens, "identical_prefix": same, "reffuse": ours, "reference": theirs}
        description = "transformers (LlamaForCausalLM)"
        precision = "float32"  # transformers' norms, softmax and RoPE tables are float32 in any dtype
    else:
        dump = load_activations(against)
        model = load_model(model_name, dtype=dtype)
        result = compare(dump, activations(model, dump["token_ids"]))
        ids, description = dump["token_ids"], f"{against} (model {dump['model'] or '?'}; reffuse is the reference)"
        precision = "float64" if dtype == "float64" and dump["logits"].dtype == np.float64 else "float32"

    targets = TARGETS[precision]
    logits = result["logits"]
    checks = {f"logits relative <= {targets['logits_relative']:g}": logits["relative"] <= targets["logits_relative"]}
    if "logits_max_abs" in targets:
        checks[f"logits max |diff| <= {targets['logits_max_abs']:g}"] = logits["max_abs"] <= targets["logits_max_abs"]
    if "greedy" in result:
        checks[f"greedy ids identical for {generate_tokens} tokens"] = \
            result["greedy"]["identical_prefix"] == generate_tokens
    result.update({"model": model.config.name, "against": description, "dtype": dtype, "tokens": len(ids),
                   "targets": precision, "targets_met": checks})
    return result
