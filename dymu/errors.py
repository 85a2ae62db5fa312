"""Errors that mean "the input is wrong", as opposed to a bug: the CLI prints them as one line."""


class DymuError(Exception):
    """Base of every error caused by what the user gave us (a file, a config, a model, a value)."""
