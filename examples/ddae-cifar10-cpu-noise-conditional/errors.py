"""User mistakes as one readable line: the exception type, and the command-line runner that prints it.

Library code raises ``UsageError`` (a ``ValueError``) for anything the caller can fix: a bad flag, a
missing folder, a model or data set that cannot be used. The command-line entry points run through
``run_command``, which prints ``<prog>: error: <message>`` and exits with status 2 for those, and lets
every other exception (a real bug) raise with its traceback. Set ``DDAE_TRACEBACK=1`` to see the
traceback of a usage error too.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

TRACEBACK_ENV = "DDAE_TRACEBACK"


class UsageError(ValueError):
    """Something the user asked for cannot be done; the message says what was wrong and how to fix it."""


class UsageTypeError(UsageError, TypeError):
    """An argument of the wrong type or class (a model this package cannot use, say); also a ``TypeError``."""


def fail(prog: str, message: str, status: int = 2) -> None:
    """Prints ``<prog>: error: <message>`` on one line to stderr and exits with ``status``.

    Under a multi-process launch only the main process (``RANK`` 0) prints: every process meets the same
    mistake, and the user needs to read it once.
    """
    if os.environ.get("RANK", "0") == "0":
        print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(status)


class OneLineErrors:
    """Mixin for ``argparse.ArgumentParser`` subclasses: a parse error is one line (no usage block)."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse's hook
        fail(self.prog, f"{message} (see --help)")


class ArgumentParser(OneLineErrors, argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line with exit status 2."""


def run_command(prog: str, main: Callable[[], Any]) -> Any:
    """Runs ``main()``; a ``UsageError`` becomes one line and exit status 2 unless ``DDAE_TRACEBACK`` is set."""
    try:
        return main()
    except UsageError as error:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        fail(prog, str(error))
