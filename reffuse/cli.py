"""The `reffuse` command line: one subcommand per module in reffuse/commands/.

Each command module has a docstring (its --help description), HELP (its one-line summary),
add_arguments(parser) and run(args) -> exit status.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import re
import sys

from reffuse.errors import ReffuseError
from reffuse.outputs import Terminated, running

COMMANDS = ["demo", "fetch", "generate", "verify", "dump", "eval", "bench", "tp", "costmodel", "analyze", "figures",
            "fuse", "heal", "experiments", "healing-study", "export", "conformance"]

EPILOG = """examples:
  reffuse demo                      the whole FFN Fusion pipeline on the default model
  reffuse demo --model tiny --json  the offline path on a synthetic model, as JSON
  reffuse COMMAND --help            what a command does, its options and examples
"""


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose error for a mistyped command, choice or flag names the closest one it knows."""

    def error(self, message):
        super().error(message + closest(self, message))


class CommandParser(Parser):
    """A command's parser: an argument it does not know is an error here, where the command's own flags are known."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def closest(parser: argparse.ArgumentParser, message: str) -> str:
    """' (did you mean X?)' for the first mistyped value or flag an argparse error names, where one is close."""
    choice = re.search(r"invalid choice: '([^']*)'", message)
    if choice:
        word, known = choice.group(1), [str(c) for a in parser._actions if a.choices for c in a.choices]
    elif message.startswith("unrecognized arguments: "):
        flags = [w for w in message.split()[2:] if w.startswith("-")]
        word, known = (flags[0].split("=")[0] if flags else ""), [f for a in parser._actions for f in a.option_strings]
    else:
        return ""
    match = difflib.get_close_matches(word, known, n=1, cutoff=0.75)
    return f" (did you mean {match[0]}?)" if match else ""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="reffuse", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="FFN Fusion (arXiv 2503.18908) in NumPy: run a run of attention-free transformer blocks "
                    "in parallel, fuse it into one wide SwiGLU, and measure what that costs and saves.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    for name in COMMANDS:
        module = importlib.import_module(f"reffuse.commands.{name.replace('-', '_')}")
        sub = commands.add_parser(name, help=module.HELP, description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        # tp writes nothing, and its ranks are ended by MPI's launcher, which must not wait for a rank in a collective
        with running(args.command, stop_on_sigterm=args.command != "tp"):
            return args.run(args) or 0
    except ReffuseError as e:
        print(f"reffuse {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except OSError as e:  # the machine refused: a full disk, a permission, a vanished file
        where = f"{e.filename}: " if e.filename else ""
        print(f"reffuse {args.command}: error: {where}{e.strerror or e} (the operating system refused; check the path, "
              "its permissions and the free space)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"reffuse {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"reffuse {args.command}: terminated", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
