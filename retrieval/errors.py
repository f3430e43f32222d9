"""The one error type for faults a user can fix (a file, a flag, the network), and the one place
that turns it into the `error: <file>: <fault>` line and exit code a script prints.

Library code raises `UserError("<file or flag>: <fault>")` (or a subclass: io.HandoffError,
analysis.AnalysisError, download.DownloadError) and never exits the process; a script wraps its
`main` in `cli`, so a caller such as search.py or a test can catch the typed error, while a user
at the shell sees one line and a non-zero status instead of a traceback.
"""
import functools


class UserError(Exception):
    """A fault in the user's input or environment. str() is '<file or flag>: <fault>'."""


def cli(main):
    """Decorate a script's main(argv=None): a UserError becomes SystemExit('error: <message>')."""
    @functools.wraps(main)
    def run(argv=None):
        try:
            return main(argv)
        except UserError as e:
            raise SystemExit(f"error: {e}") from None
    return run
