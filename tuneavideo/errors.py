"""The one error type that command-line tools report as a single line (no traceback)."""


class UserError(ValueError):
    """Bad input, files or settings the user can fix; the message names the file or key and what to do.

    `train_tuneavideo.py` and `inference.py` print it as one line and exit non-zero; `--debug` (or
    `TUNEAVIDEO_DEBUG=1`) shows the traceback instead. Anything else is a bug and keeps its traceback.
    """


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none): libraries' messages often run over
    many lines, and a `UserError` quoting one must stay one line."""
    text = str(err).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(err).__name__
