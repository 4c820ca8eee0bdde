"""User-facing errors: one line on stderr, exit code 2, no traceback.

Library code raises `UserError` for anything the user can fix (a bad path, a typo in a
recipe, a corrupt file). Entry scripts wrap their `main` in `run_cli`, which prints the
message and exits 2; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable


class UserError(Exception):
    """A problem with the user's input, described in one line that says what to do."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the scripts' error contract: a bad command line is one `error:` line and
    exit 2 (via run_cli), not the usage block; `--help` still prints the full usage."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    try:
        code = main(argv)
    except UserError as e:
        msg = " ".join(str(e).split())  # always one line
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
