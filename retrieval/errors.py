"""The one error type for faults a user can fix (a file, a flag, the network), and the one place
that turns it into the `error: <file>: <fault>` line and exit code a script prints (and Ctrl-C into one
`interrupted; ...` line, exit 130); plus the parser and help formatter the scripts share, so a bad flag
is one line too and `--help` shows every real default and no empty ones.

Library code raises `UserError("<file or flag>: <fault>")` (or a subclass: io.HandoffError,
runs.AnalysisError, download.DownloadError) and never exits the process; a script wraps its
`main` in `cli`, so a caller such as search.py or a test can catch the typed error, while a user
at the shell sees one line and a non-zero status instead of a traceback.
"""
from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn


class UserError(Exception):
    """A fault in the user's input or environment. str() is '<file or flag>: <fault>'."""


# What a script says on Ctrl-C (SIGINT) unless it names its own wording: every output is written
# atomically, so an interrupted run loses only the item in progress and the same command continues.
INTERRUPTED = "interrupted; completed runs kept; run the same command to resume"
# The shell's status for a process ended by SIGINT (128 + 2): a calling script or scheduler sees the cause.
INTERRUPTED_STATUS = 130


def cli(main: Callable[[Sequence[str] | None], Any] | None = None, *, interrupted: str = INTERRUPTED) -> Any:
    """Decorate a script's main(argv=None): a UserError becomes SystemExit('error: <message>'), Ctrl-C
    the one line `interrupted` on stderr and exit status 130 (no traceback). Use as @cli, or as
    @cli(interrupted="...") where the script's own wording says better what was kept."""
    def decorate(main: Callable[[Sequence[str] | None], Any]) -> Callable[[Sequence[str] | None], Any]:
        @functools.wraps(main)
        def run(argv: Sequence[str] | None = None) -> Any:
            try:
                return main(argv)
            except UserError as e:
                raise SystemExit(f"error: {e}") from None
            except KeyboardInterrupt:
                print(interrupted, file=sys.stderr, flush=True)
                raise SystemExit(INTERRUPTED_STATUS) from None
        return run
    return decorate(main) if main is not None else decorate


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose faults (a value a flags.py type refuses, an unknown flag, a bad choice) are
    the one line 'error: --flag: <fault> (see --help)', exit status 2, not the usage block."""

    def error(self, message: str) -> NoReturn:
        # argparse says 'argument --warmup: ...'; the project's form is '<flag>: <fault>'.
        self.exit(2, f"error: {message.removeprefix('argument ')} (see --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends '(default: X)' to a flag's help, except where X says nothing: an empty string or None
    (the help text then says what an empty value means) or a switch that is off by default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        # identity, not ==: a default of 0 is a real default (0 == False)
        if action.default is None or action.default is False or action.default == "" \
                or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)
