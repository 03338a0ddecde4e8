"""The `compress` command: dispatch to a subcommand and map errors to exit codes.

    compress MODEL --recipe R -o OUT [--dry-run] [--overwrite] ...
    compress recipes

Subcommands live in `compressor.commands`, one module each.
Exit codes: 0 success, 1 failure during compression, 2 bad input (one line on stderr,
nothing written), 130 interrupted.
"""

from __future__ import annotations

import os
import sys

from compressor.errors import CompressionError, UserError


def main(argv: list[str] | None = None) -> int:
    from compressor.commands import command_for

    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        command, rest = command_for(argv)
        return command(rest)
    except UserError as err:
        print(f"error: {err.format()}", file=sys.stderr)
        return err.exit_code
    except CompressionError as err:
        print(f"compression failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
