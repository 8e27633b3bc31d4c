"""cbpt-guard's bottom layer: errors, atomic writes and the artifact format every package shares.

It imports nothing of ours and no torch; `cbpt`, `export`, `guard`, `testbed` and the CLI
(`cbpt_cli`) build on it. See docs/architecture.md.
"""

__version__ = "0.2.0"
TOOL = f"cbpt-guard {__version__}"
