"""The errors a user sees as one line naming the flag or file at fault (the programs print
them and exit 2)."""


class ConfigError(ValueError):
    """An option outside its allowed range, named by its command-line flag, in one line."""
