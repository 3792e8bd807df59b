"""The `reffuse` command line: one subcommand per module in reffuse/commands/.

Each command module has a docstring (its --help description), HELP (its one-line summary),
add_arguments(parser) and run(args) -> exit status.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from reffuse.errors import ReffuseError
from reffuse.files import Terminated, running

COMMANDS = ["demo", "fetch", "generate", "verify", "dump", "eval", "bench", "tp", "costmodel", "analyze", "figures",
            "fuse", "heal", "experiments", "healing-study", "export", "conformance"]

EPILOG = """examples:
  reffuse demo                      the whole FFN Fusion pipeline on the default model
  reffuse demo --model tiny --json  the offline path on a synthetic model, as JSON
  reffuse COMMAND --help            what a command does, its options and examples
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reffuse", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="FFN Fusion (arXiv 2503.18908) in NumPy: run a run of attention-free transformer blocks "
                    "in parallel, fuse it into one wide SwiGLU, and measure what that costs and saves.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
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
