"""The errors a user sees as one line naming the flag or file at fault (the programs print
them and exit 2)."""


def error_line(err: BaseException) -> str:
    """An error quoted in one line: the first line of its message, or its type's name when it
    has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class ConfigError(ValueError):
    """An option outside its allowed range, named by its command-line flag, in one line."""
