"""How the command-line tools end: a `UserError` as one line, Ctrl-C quietly, real bugs with their traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from .errors import UserError

DEBUG_ENV = "TUNEAVIDEO_DEBUG"


def run_cli(main: Callable[[list[str]], None], prog: str, argv: list[str] | None = None) -> None:
    """Run `main(argv)`; `--debug` in argv (removed before `main` sees it) or TUNEAVIDEO_DEBUG=1 keeps tracebacks."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        main(argv)
    except UserError as err:
        if debug:
            raise
        message = " ".join(str(err).split())  # one line, whatever the message held
        sys.exit(f"{prog}: error: {message}")
    except KeyboardInterrupt as interrupt:
        if debug:
            raise
        sys.exit(f"{prog}: interrupted" + (f"; {interrupt}" if str(interrupt) else ""))
