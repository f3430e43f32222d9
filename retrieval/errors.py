"""The one error type for faults a user can fix (a file, a flag, the network), and the one place
that turns it into the `error: <file>: <fault>` line and exit code a script prints; plus the help
formatter the scripts share, so `--help` shows every real default and no empty ones.

Library code raises `UserError("<file or flag>: <fault>")` (or a subclass: io.HandoffError,
runs.AnalysisError, download.DownloadError) and never exits the process; a script wraps its
`main` in `cli`, so a caller such as search.py or a test can catch the typed error, while a user
at the shell sees one line and a non-zero status instead of a traceback.
"""
from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Sequence
from typing import Any


class UserError(Exception):
    """A fault in the user's input or environment. str() is '<file or flag>: <fault>'."""


def cli(main: Callable[[Sequence[str] | None], Any]) -> Callable[[Sequence[str] | None], Any]:
    """Decorate a script's main(argv=None): a UserError becomes SystemExit('error: <message>')."""
    @functools.wraps(main)
    def run(argv: Sequence[str] | None = None) -> Any:
        try:
            return main(argv)
        except UserError as e:
            raise SystemExit(f"error: {e}") from None
    return run


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends '(default: X)' to a flag's help, except where X says nothing: an empty string or None
    (the help text then says what an empty value means) or a switch that is off by default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        # identity, not ==: a default of 0 is a real default (0 == False)
        if action.default is None or action.default is False or action.default == "" \
                or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)
