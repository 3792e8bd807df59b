"""The conformance kit: small models of every Nemotron-NAS (DeciLM) block pattern, with token ids and reffuse's
outputs for them, to hold an inference engine against (`reffuse conformance --out DIR`).

Each pattern of reffuse.core.patterns becomes a folder of the kit:

    <pattern>/nemotron-nas/             the model as a DeciLM folder (config.json, model.safetensors, tokenizer)
    <pattern>/model-f32.gguf            the same weights as llama.cpp's `deci` (or `llama`) GGUF, F32
    <pattern>/reference-float64.npz     token ids, logits, the stream after every block and every sub-block's
    <pattern>/reference-float32.npz       output (reffuse.evaluation.activations' dump format), float64 and float32

Weights are random (seeded) and rounded to float32, so the float64 reference is the exact function of the very
weights the F32 files hold (a GGUF holds RMSNorm's eps as a float32 too: ~1e-12 of the logits). The tokenizer
is byte-level (256 bytes, 3 merges, <|endoftext|>): any text encodes.
A pattern an engine format cannot hold has no file there, and kit.json says why; where an engine is known to
compute a pattern wrongly, the kit holds the pattern as written without reffuse's workaround too, as a minimal
reproduction (kit.json's `reproduction`).

`verify_kit` runs llama.cpp on every GGUF of the kit and compares its logits with the float64 reference: one
row per pattern, judged against reffuse.evaluation.verify.TARGETS["llama.cpp"].
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reffuse.core.fusion import fuse
from reffuse.core.layout import BlockLayout, blocks_from_json, blocks_to_json
from reffuse.core.model import cast
from reffuse.core.patterns import FUSED, PATTERN_CONFIG, PATTERNS, build_pattern
from reffuse.errors import ReffuseError
from reffuse.evaluation.activations import (FORMAT as DUMP_FORMAT, Activations, activations, compare,
                                           load_activations, save_activations)
from reffuse.files import read_json
from reffuse.formats.checkpoint import save_nemotron_nas
from reffuse.formats.gguf_export import plan_gguf, save_gguf
from reffuse.optional import require
from reffuse.outputs import staged_folder
from reffuse.records import FlatRecord, as_tuple, present_fields

KIT_FORMAT = "reffuse-conformance-1"
KIT_FILE = "kit.json"
TOKENS = 32
# The pattern llama.cpp's deci graph computes wrongly as written (a layer with feed_forward_length 0 continues
# to the next layer before keeping its attention output), and why.
LLAMACPP_DIVERGENCE = {
    "ffn-no-op-attention-kept": "llama.cpp's deci graph skips to the next layer before keeping the attention "
                                "output of a layer whose feed_forward_length is 0 (src/models/deci.cpp): that "
                                "block's attention is lost"}


def byte_level_tokenizer():
    """A byte-level BPE of 260 tokens: the 256 bytes, 3 merges and <|endoftext|>; any text encodes, and llama.cpp
    loads it (it needs merges and knows GPT-2's split as "default")."""
    tokenizers = require("tokenizers", "real", "the conformance kit's tokenizer")
    from reffuse.formats.tokenizer import Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("Ġ", "t"), ("h", "e"), ("i", "n")]
    for first, second in merges:
        vocab[first + second] = len(vocab)
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    backend.add_special_tokens([tokenizers.AddedToken("<|endoftext|>", special=True)])
    return Tokenizer(backend, None, "<|endoftext|>", None, False, "the conformance kit's byte-level tokenizer",
                     pre="default")


def pattern_model(name: str, seed: int = 0):
    """The kit's model of pattern `name` (named so), float64, with weights that float32 holds exactly (fused where
    FUSED says)."""
    model = build_pattern(PATTERNS[name][1], seed, dataclasses.replace(PATTERN_CONFIG, name=name))
    model = fuse(model, FUSED[name]) if name in FUSED else model  # then rounded: fusion folds gains into weights
    return cast(cast(model, "float32"), "float64")


def is_kit(folder) -> bool:
    """A folder `build_kit` wrote (its kit.json says so)."""
    try:
        return json.loads((Path(folder) / KIT_FILE).read_text()).get("format") == KIT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


@dataclass(frozen=True)
class KitConfig(FlatRecord):
    """What every model of the kit shares."""
    dim: int
    n_heads: int
    n_kv_heads: int       # unless a block says otherwise
    head_dim: int
    vocab_size: int
    rope_theta: float
    norm_eps: float


@dataclass(frozen=True)
class Reproduction(FlatRecord):
    """A pattern written the way an engine is known to compute wrongly: a minimal reproduction."""
    gguf: str             # the file, relative to the kit
    engine: str
    why: str


@dataclass(frozen=True)
class KitPattern:
    """One pattern of the kit: its blocks, and its files (paths relative to the kit)."""
    name: str
    description: str
    blocks: tuple[BlockLayout, ...]
    nemotron_nas: str                          # the DeciLM folder
    gguf: str | None                           # None where no GGUF can hold the pattern
    references: dict[str, str]                 # dtype -> the reference dump
    not_in_gguf: str | None = None             # why no GGUF holds it
    gguf_architecture: str | None = None
    gguf_notes: tuple[str, ...] | None = None  # what the GGUF holds other than the model as it is
    reproduction: Reproduction | None = None

    def to_json(self) -> dict:
        return present_fields(self, kept_when_none=("gguf",)) | {
            "blocks": blocks_to_json(self.blocks)}

    @classmethod
    def from_json(cls, raw: dict) -> KitPattern:
        reproduction = raw.get("reproduction")
        return cls(raw["name"], raw["description"], blocks_from_json(raw["blocks"], f"{KIT_FILE}: {raw['name']}"),
                   raw["nemotron_nas"], raw["gguf"], raw["references"], raw.get("not_in_gguf"),
                   raw.get("gguf_architecture"), as_tuple(raw.get("gguf_notes")),
                   None if reproduction is None else Reproduction.from_json(reproduction))


@dataclass(frozen=True)
class KitManifest:
    """What kit.json holds: the kit's format, its shared configuration, the token ids' seed, and every pattern."""
    format: str            # KIT_FORMAT
    dump_format: str       # the references' format (reffuse.evaluation.activations.FORMAT)
    tokens: int            # token ids per pattern
    seed: int
    config: KitConfig
    patterns: tuple[KitPattern, ...]

    def to_json(self) -> dict:
        return {"format": self.format, "dump_format": self.dump_format, "tokens": self.tokens, "seed": self.seed,
                "config": self.config.to_json(), "patterns": [p.to_json() for p in self.patterns]}

    @classmethod
    def from_json(cls, raw: dict) -> KitManifest:
        return cls(raw["format"], raw["dump_format"], raw["tokens"], raw["seed"], KitConfig.from_json(raw["config"]),
                   tuple(KitPattern.from_json(p) for p in raw["patterns"]))


def build_pattern_files(name: str, description: str, folder: Path, tokenizer, ids, seed: int) -> KitPattern:
    """The files of one pattern in `folder` (the kit's folder of that name); returns its entry of kit.json."""
    model = pattern_model(name, seed)
    save_nemotron_nas(cast(model, "float32"), folder / "nemotron-nas", tokenizer)
    gguf = not_in_gguf = architecture = notes = reproduction = None
    try:
        plan = plan_gguf(model)
    except ReffuseError as e:
        not_in_gguf = str(e)
    else:
        gguf, architecture, notes = f"{name}/model-f32.gguf", plan.architecture, tuple(plan.notes())
        save_gguf(model, folder / "model-f32.gguf", tokenizer, "f32")
        if name in LLAMACPP_DIVERGENCE:
            save_gguf(model, folder / "model-f32-as-is.gguf", tokenizer, "f32", stand_in_ffns=False)
            reproduction = Reproduction(f"{name}/model-f32-as-is.gguf", "llama.cpp", LLAMACPP_DIVERGENCE[name])
    references = {}
    for dtype in ("float64", "float32"):
        save_activations(folder / f"reference-{dtype}.npz", activations(cast(model, dtype), ids, sub_blocks=True),
                         f"{name} ({dtype})")
        references[dtype] = f"{name}/reference-{dtype}.npz"
    return KitPattern(name, description, model.layout().blocks, f"{name}/nemotron-nas", gguf, references,
                      not_in_gguf, architecture, notes, reproduction)


def build_kit(out, overwrite: bool = False, tokens: int = TOKENS, seed: int = 0) -> KitManifest:
    """Write the kit into the folder `out` (all or nothing); returns its manifest (kit.json)."""
    if not 1 <= tokens <= PATTERN_CONFIG.max_positions:
        raise ReffuseError(f"--reference-tokens {tokens}: give 1 to {PATTERN_CONFIG.max_positions} (the kit's "
                           "context length)")
    tokenizer = byte_level_tokenizer()
    ids = np.random.default_rng(seed).integers(0, PATTERN_CONFIG.vocab_size, tokens)
    config = KitConfig(PATTERN_CONFIG.dim, PATTERN_CONFIG.n_heads, PATTERN_CONFIG.n_kv_heads, PATTERN_CONFIG.head_dim,
                       PATTERN_CONFIG.vocab_size, PATTERN_CONFIG.rope_theta, PATTERN_CONFIG.norm_eps)
    with staged_folder(out, overwrite, is_kit, "conformance kit") as staging:
        patterns = tuple(build_pattern_files(name, description, staging / name, tokenizer, ids, seed)
                         for name, (description, _) in PATTERNS.items())
        manifest = KitManifest(KIT_FORMAT, DUMP_FORMAT, tokens, seed, config, patterns)
        (staging / KIT_FILE).write_text(json.dumps(manifest.to_json(), indent=1) + "\n")
        (staging / "README.md").write_text(kit_readme(manifest))
    return manifest


def load_kit(folder) -> KitManifest:
    """The manifest of the kit in `folder`, checked to be one."""
    folder = Path(folder)
    manifest = read_json(folder / KIT_FILE, "write a kit with `reffuse conformance --out FOLDER`")
    if not isinstance(manifest, dict) or manifest.get("format") != KIT_FORMAT:
        raise ReffuseError(f"{folder / KIT_FILE} is not a conformance kit of format {KIT_FORMAT}: write the kit "
                           "again with `reffuse conformance --out FOLDER`")
    return KitManifest.from_json(manifest)


@dataclass(frozen=True)
class KitRow:
    """llama.cpp on one GGUF of the kit (verify_kit), its logits against the kit's float64 reference."""
    pattern: str                   # the pattern, or its reproduction
    file: str                      # the GGUF, relative to the kit ("-" where none)
    relative: float | None         # max |logit difference| over max |reference logit|; None where not run
    top1_agreement: float | None
    verdict: str
    met: bool | None = None        # agrees, or diverges as known; None where not run
    note: str = ""                 # a known divergence, or what the GGUF holds beside the model

    def to_json(self) -> dict:
        return present_fields(self, kept_when_none=("relative", "top1_agreement"))

    @classmethod
    def from_json(cls, raw: dict) -> KitRow:
        return cls(raw["pattern"], raw["file"], raw["relative"], raw["top1_agreement"], raw["verdict"],
                   raw.get("met"), raw["note"])


def verify_kit(folder, threads: int | None = None) -> list[KitRow]:
    """llama.cpp on every GGUF of the kit against the float64 reference: one row per pattern (and one per
    reproduction), with the largest logit difference over the largest logit, top-1 agreement and the verdict."""
    from reffuse.evaluation.llamacpp import LlamaCpp
    from reffuse.evaluation.verify import TARGETS

    folder, target = Path(folder), TARGETS["llama.cpp"]["relative"]
    rows = []
    for entry in load_kit(folder).patterns:
        reference = load_activations(folder / entry.references["float64"])
        files = [(entry.name, entry.gguf, None)]
        if entry.reproduction is not None:
            files.append((f"{entry.name} (as is, no stand-in FFN)", entry.reproduction.gguf, entry.reproduction.why))
        for label, gguf, known in files:
            if gguf is None:
                rows.append(KitRow(label, "-", None, None, "not in GGUF", note=entry.not_in_gguf or ""))
                continue
            ids = reference.token_ids
            engine = LlamaCpp(folder / gguf, n_ctx=max(64, len(ids) + 8), threads=threads)
            logits = engine.logits(ids)
            del engine
            result = compare(Activations(ids, logits), reference, sides=("llama.cpp", "the reference"))
            met = result.logits.relative <= target
            verdict = ("agrees" if met else "DIVERGES") if known is None else \
                ("known divergence reproduced" if not met else "agrees: the known divergence is gone")
            rows.append(KitRow(label, gguf, result.logits.relative, result.top1_agreement, verdict,
                               met or known is not None, known or "; ".join(entry.gguf_notes or ())))
    return rows


def kit_readme(manifest: KitManifest) -> str:
    """The README written into the kit, for engine developers."""
    rows = "\n".join(f"| `{p.name}` | {p.description} | "
                     + (f"`{p.gguf}` ({p.gguf_architecture})" if p.gguf else "none: " + p.not_in_gguf) + " |"
                     for p in manifest.patterns)
    return KIT_README.format(tokens=manifest.tokens, rows=rows, format=manifest.dump_format,
                             **manifest.config.to_json())


KIT_README = """# A conformance kit for Nemotron-NAS (DeciLM) engines

Small random models, one per block pattern that Nemotron-NAS models (the Llama-Nemotron family FFN Fusion starts
from and produces) hold, each with token ids and the outputs an exact implementation gives for them. Written by
`reffuse conformance`; regenerate it the same way (the weights are seeded).

Every model: width {dim}, {n_heads} query heads of {head_dim} dimensions, {n_kv_heads} key/value heads unless a
block says otherwise, vocabulary {vocab_size} (a byte-level BPE), RoPE base {rope_theta:g}, RMSNorm eps {norm_eps:g},
an untied LM head; {tokens} token ids per pattern.

| pattern | what it exercises | llama.cpp file |
|---|---|---|
{rows}

## What each folder holds

- `nemotron-nas/`: the model as a DeciLM folder (`config.json` with `block_configs`, `model.safetensors` in
  float32, the tokenizer). Load it as your engine loads Nemotron-NAS checkpoints. Its FFN widths follow from
  `ffn_mult` in steps of 256, so an FFN narrower than that is stored padded with zero units (they add exactly
  nothing); the GGUF holds the same FFN unpadded.
- `model-f32.gguf`: the same weights as a llama.cpp GGUF (`deci`, or `llama` for the plain pattern), F32.
- `reference-float64.npz`, `reference-float32.npz`: reffuse's outputs, the first computed in float64 on the very
  weights the float32 files hold (they are float32 numbers), in the dump format `{format}`:
  `token_ids` [T], `logits` [T, vocab], `hidden_states` [L+1, T, d] (the stream after the embedding and after
  each block, before the final norm), and per block `resid_mid` (the stream after attention), `attn_out` and
  `mlp_out` (what each sub-block adds; zeros where it is absent) [L, T, d]. Read them with
  `numpy.load(path, allow_pickle=False)`.
- `kit.json`: the list of patterns, their block layouts, the files, and for each engine format that cannot hold
  a pattern the reason; where an engine is known to compute a pattern wrongly, a minimal reproduction.

## Holding an engine against it

1. Run your engine on each model with the pattern's `token_ids` (no tokenizer needed) and take the logits of
   every position; in float32 they should be within 1e-4 of the largest logit of `reference-float64.npz`
   (float32 rounding over a few blocks is ~1e-6 of it).
2. Better, write a dump in the same format (the logits, and as many of `hidden_states`, `resid_mid`, `attn_out`,
   `mlp_out` as your engine can give) and let reffuse compare every step:

       reffuse verify --model KIT/PATTERN/nemotron-nas --against your-dump.npz

   It names the first sub-block that diverges (`block 1 attn_out` rather than "the logits differ"). A float64
   dump is compared in float64 (target 1e-9 of each output's largest value).
3. For llama.cpp itself: `reffuse verify --model KIT --against llama.cpp` runs every GGUF of the kit and prints
   one line per pattern.

## Known divergences

The pattern `ffn-no-op-attention-kept` (a block that keeps attention and has no FFN, what FFN removal leaves) is
computed wrongly by llama.cpp's `deci` graph when written as it is (`feed_forward_length` 0 for that layer): the
layer skips ahead before its attention output is kept. `ffn-no-op-attention-kept/model-f32-as-is.gguf` is that
minimal reproduction; `model-f32.gguf` holds the same function with an all-zero FFN of 32 units in that layer
(it adds exactly nothing), which llama.cpp computes right. `reffuse export --format gguf` writes that form and
says so.
"""
