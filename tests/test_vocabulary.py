"""One vocabulary across the subcommands: one flag per concept, the same meaning and default wherever it appears,
and help text on every flag."""

import pytest

from reffuse.cli import build_parser

# concept: (the one flag, names that must not stand for it anywhere)
CONCEPTS = {
    "remove the attention of given blocks": ("--drop-attention", ["--remove-attention", "--remove"]),
    "remove the attention of N consecutive blocks": ("--drop-attention-count", ["--contiguous", "--remove-count"]),
    "let a group include its run's last FFN": ("--include-last", ["--keep-last-ffn", "--keep-last"]),
    "blocks per window of the dependency statistics": ("--window-blocks", []),
    "held-out tokens judged on": ("--held-out-tokens", []),
    "calibration tokens": ("--calibration-tokens", []),
    "where results are written": ("--out", ["--figures", "--output", "--dir"]),
    "one JSON object on stdout instead of the tables": ("--json", []),
    "prefill length of the tensor-parallel job": ("--prefill-tokens", []),
}
# --tokens means "the first N tokens of the input text" and nothing else
TOKENS_COMMANDS = {"verify", "dump"}
# the same default wherever the concept appears
DEFAULTS = {"--calibration-tokens": 2048, "--max-group-size": 4, "--model": "smollm2", "--dtype": "float32"}
MODEL_IS_A_LAYOUT = {"costmodel"}  # its --model names layouts to project (the paper's by default)
MODEL_IS_REQUIRED = {"heal"}  # its --model is the student to heal: there is no sensible default


def subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def options(subparser):
    return [a for a in subparser._actions if a.option_strings and "-h" not in a.option_strings]


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_flag_has_help_and_one_name_per_concept(name):
    flags = {flag: action for action in options(subcommands()[name]) for flag in action.option_strings}
    for flag, action in flags.items():
        assert action.help and action.help.strip(), f"reffuse {name} {flag} has no help text"
    for concept, (flag, synonyms) in CONCEPTS.items():
        for synonym in synonyms:
            assert synonym not in flags, f"reffuse {name} says {synonym} for '{concept}': use {flag}"
    if "--tokens" in flags:
        assert name in TOKENS_COMMANDS, f"reffuse {name} --tokens: name what the tokens are (--held-out-tokens, ...)"
    if "--window" in flags:
        assert "tokens" in flags["--window"].help, f"reffuse {name} --window must count tokens"


def test_a_shared_flag_means_the_same_everywhere():
    helps, defaults = {}, {}
    for name, subparser in subcommands().items():
        for action in options(subparser):
            flag = action.option_strings[-1]
            helps.setdefault(flag, {})[name] = action.help
            defaults.setdefault(flag, {})[name] = action.default
    for flag in ("--json", "--dtype", "--drop-attention-count", "--held-out-tokens", "--calibration-tokens",
                 "--scoring-tokens", "--dependency-tokens"):
        meanings = {help_.split(" (default")[0] for help_ in helps.get(flag, {}).values()}
        assert len(meanings) == 1, f"{flag} is explained {len(meanings)} ways: {meanings}"
    for flag, default in DEFAULTS.items():
        differing = {name: d for name, d in defaults.get(flag, {}).items()
                     if d != default and not (flag == "--model" and name in MODEL_IS_A_LAYOUT | MODEL_IS_REQUIRED)}
        assert not differing, f"{flag} defaults to {default} except in {differing}"
