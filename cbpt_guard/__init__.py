"""cbpt-guard: the command-line layer and the few helpers every package shares."""

__version__ = "0.1.0"
