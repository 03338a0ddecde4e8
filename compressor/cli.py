"""The `compress` command: dispatch to a subcommand and map errors to exit codes.

    compress MODEL --recipe R -o OUT [--dry-run] [--overwrite] ...
    compress recipes

Subcommands live in `compressor.commands`, one module each.
Exit codes: 0 success, 1 failure during compression (a full disk included), 2 bad input (one line on stderr,
nothing written), 130 interrupted.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from compressor.commands.library_notices import drop_library_noise
from compressor.errors import CompressionError, UserError, storage_failure


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup (`finally` blocks) runs as for Ctrl-C."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    from compressor.commands import command_for

    argv = list(sys.argv[1:] if argv is None else argv)
    drop_library_noise()  # before a command imports bitsandbytes, which logs at import
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM)
    if in_main_thread:  # signal handlers can only be installed from the main thread
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        command, rest = command_for(argv)
        return command(rest)
    except UserError as err:
        print(f"error: {err.format()}", file=sys.stderr)
        return err.exit_code
    except CompressionError as err:
        print(f"compression failed: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # only a refused write becomes one line; anything else is a bug to show
        failure = storage_failure(err)
        if failure is None:
            raise
        print(f"write failed: {failure}; the output was not written (free space, or pick another folder)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the output was not written", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated: the output was not written", file=sys.stderr)
        return 143
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
