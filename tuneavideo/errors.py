"""The one error type that command-line tools report as a single line (no traceback)."""


class UserError(ValueError):
    """Bad input, files or settings the user can fix; the message names the file or key and what to do.

    `train_tuneavideo.py` and `inference.py` print it as one line and exit non-zero; `--debug` (or
    `TUNEAVIDEO_DEBUG=1`) shows the traceback instead. Anything else is a bug and keeps its traceback.
    """
