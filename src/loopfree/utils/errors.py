"""The library's error types. Library code raises them; only the CLI turns them into exit codes."""


class LoopfreeError(ValueError):
    """Bad input from the user (a file, a folder, a number): the CLI prints it as one line and exits 2."""


class Interrupted(Exception):
    """Training stopped by SIGTERM/SIGINT after saving a checkpoint: the CLI exits 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    def __reduce__(self):  # crosses process boundaries intact (the demo trains students in worker processes)
        return Interrupted, (str(self), self.signum)


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (a third-party error can be a page long), or its type's name."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def short(value: object, head: int = 4, width: int = 60) -> str:
    """``value`` quoted for a one-line message: a list as its first ``head`` items, its last and a count when
    longer; anything else as its repr, cut at ``width`` characters."""
    if isinstance(value, (list, tuple)):
        items = [short(v, head, 20) for v in value]
        if len(items) <= head + 1:
            return "[" + ", ".join(items) + "]"
        return f"[{', '.join(items[:head])}, …, {items[-1]}] ({len(items)} values)"
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"
