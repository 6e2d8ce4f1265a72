"""``python -m ucm COMMAND ...``: ucm's operator commands.

A dispatcher only, so that ``import ucm`` and ``python -m ucm`` with a typo stay cheap
(nothing imports vLLM until a command runs). Commands:

* ``precompute``: store a corpus's chunks in a file store
  (:mod:`ucm.integration.vllm.corpus_precompute`; also the ``ucm-precompute`` script).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

USAGE = """usage: python -m ucm COMMAND [options]

commands:
  precompute   store each corpus document's KV as a Blend chunk in a file store
               (python -m ucm precompute --model M --corpus docs.jsonl --store DIR [--shard i/n];
                python -m ucm precompute --help for every option)
"""

EXIT_USAGE = 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command named first in ``argv``; usage and exit code 2 for none or an unknown one."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0
    if not args or args[0] != "precompute":
        if args:
            print(f"python -m ucm: unknown command {args[0]!r}", file=sys.stderr)
        print(USAGE, end="", file=sys.stderr)
        return EXIT_USAGE
    from ucm.integration.vllm.precompute_cli import main as precompute

    return precompute(args[1:], prog="python -m ucm precompute")


if __name__ == "__main__":
    sys.exit(main())
