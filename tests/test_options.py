"""Each command's defaults are declared once, in the options dataclass its library function takes: the parser,
given only the required flags, fills in exactly those defaults."""

import dataclasses

import pytest

from reffuse.cli import build_parser
from reffuse.experiments.demo import DemoOptions
from reffuse.experiments.heal import HealOptions
from reffuse.method.analysis import AnalysisOptions
from reffuse.method.pipeline import FuseOptions
from reffuse.tp.job import JobOptions

COMMANDS = [  # command, its options, the required flags (given values the defaults are not compared against)
    ("demo", DemoOptions, {}),
    ("heal", HealOptions, {"--model": "m", "--out": "o"}),
    ("analyze", AnalysisOptions, {"--out": "o"}),
    ("fuse", FuseOptions, {"--model": "m", "--out": "o", "--groups": "2-3"}),
    ("tp", JobOptions, {}),
]


@pytest.mark.parametrize("command, options, required", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_the_command_and_the_library_agree_on_every_default(command, options, required):
    arguments = [command] + [part for flag, value in required.items() for part in (flag, value)]
    parsed = options.from_namespace(build_parser().parse_args(arguments))
    given = {flag.lstrip("-").replace("-", "_") for flag in required}
    differing = {f.name: (getattr(parsed, f.name), f.default) for f in dataclasses.fields(options)
                 if f.name not in given and f.default is not dataclasses.MISSING
                 and getattr(parsed, f.name) != f.default}
    assert not differing, f"reffuse {command}: parser default vs library default: {differing}"
