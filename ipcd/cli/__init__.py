"""The command-line edge: the only place where exceptions become exit statuses."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

from ipcd.errors import ExitCode, IpcdError


def run(prog: str, main: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """Call ``main`` and map what it raises to one stderr line and a documented status."""
    try:
        return main(sys.argv[1:] if argv is None else argv)
    except IpcdError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of our stdout went away (``ipcctl status | head``): not an error.
        sys.stderr.close()
        return int(ExitCode.OK)
    except Exception as exc:  # the CLI's top level: a bug, never "the job failed" (1)
        traceback.print_exc()
        print(f"{prog}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return int(ExitCode.SOFTWARE)
