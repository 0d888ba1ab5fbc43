"""Where a model or data set comes from: an existing local folder or a Hub repo id, decided in one place.

A name that looks like a local path (it starts with ``.``, ``/`` or ``~``, or its parent folder exists)
but does not exist is refused at once, instead of being tried as a Hub id.
"""

from __future__ import annotations

import os

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .errors import UsageError


def looks_local(name: str) -> bool:
    """True if ``name`` reads as a filesystem path rather than a Hub id (whether or not it exists)."""
    parent = os.path.dirname(os.path.expanduser(name).rstrip("/"))
    return name.startswith((".", "/", "~")) or (bool(parent) and os.path.isdir(parent))


def is_hub_id(name: str | None) -> bool:
    """True for a valid Hub repo id (``name`` or ``owner/name``) that is not a local path."""
    if not name or os.path.exists(os.path.expanduser(name)) or looks_local(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_source(name: str, flag: str) -> str:
    """``name`` (user-expanded if local) when it is an existing path or a valid Hub id, else a ``UsageError``.

    ``flag`` names the argument in the message, e.g. ``--model``.
    """
    local = os.path.expanduser(name)
    if os.path.exists(local):
        return local
    if looks_local(name):
        raise UsageError(
            f"{flag} {name!r} is not a folder (no such path): give an existing local folder or a Hub id (owner/name)."
        )
    if not is_hub_id(name):
        raise UsageError(f"{flag} {name!r} is neither an existing folder nor a valid Hub id: give one of the two.")
    return name
