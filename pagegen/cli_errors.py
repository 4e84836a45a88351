"""The one shape of a CLI user error: `pagegen <cmd>: <what is wrong>; <how to fix>`, exit status 2.

Every subcommand raises `UsageError` for a mistake of the user's (a bad flag value, a missing file,
a malformed spec or table); `pagegen.cli.main` prints it as one line and exits 2. No user error
ever reaches the user as a traceback.
"""

from __future__ import annotations

USAGE_EXIT = 2


class UsageError(Exception):
    """A user error of a CLI command: what is wrong, and how to fix it."""

    def __init__(self, what: str, fix: str = "") -> None:
        super().__init__(what)
        self.what = what.rstrip(". ")
        self.fix = fix.rstrip(". ")

    def line(self, command: str) -> str:
        """The one line printed for it: `pagegen <command>: <what>; <fix>`."""
        text = f"pagegen {command}: {self.what}"
        return f"{text}; {self.fix}" if self.fix else text
