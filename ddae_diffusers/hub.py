"""Uploads to the Hugging Face Hub: one helper on ``huggingface_hub``'s public API for every folder we push.

Callers write the folder first, model card (``README.md``) included, then push it as it is. That is why the
classifier and the pipeline override ``push_to_hub``: transformers' and diffusers' own versions write a
generic card over ours.
"""

from __future__ import annotations

import os

from huggingface_hub import CommitInfo, HfApi
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

from .errors import UsageError


def create_hub_repo(repo_id: str, token: str | None = None, private: bool | None = None) -> str:
    """Creates ``repo_id`` if needed (a no-op when it exists); returns its full id (``owner/name``).

    Call it before the work it publishes: a malformed id, a refused token or an unreachable Hub is a one-line
    ``UsageError`` that names the fix, before anything is computed."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UsageError(f"{repo_id!r} is not a Hub repository id ({error}): use owner/name.") from None
    try:
        return HfApi(token=token).create_repo(repo_id, private=private, exist_ok=True).repo_id
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        raise UsageError(
            f"The Hub refused to create or open {repo_id!r} (HTTP {status}): log in with `hf auth login` or pass a "
            "write token with --hub_token, and use a namespace you can write to."
        ) from None
    except Exception as error:  # offline mode, no network: the transport's own error types
        raise UsageError(
            f"Cannot reach the Hub to create {repo_id!r} ({type(error).__name__}: {error}): check the network and "
            "HF_HUB_OFFLINE, or drop --push_to_hub."
        ) from None


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    commit_message: str = "Upload folder",
    commit_description: str | None = None,
    create_pr: bool = False,
    revision: str | None = None,
    ignore_patterns: list[str] | None = None,
) -> CommitInfo:
    """``upload_folder`` of the folder's files (less ``ignore_patterns``) in one commit to an existing repo
    (make it with :func:`create_hub_repo` first, before the work, so a bad id or token fails early)."""
    return HfApi(token=token).upload_folder(
        repo_id=repo_id,
        folder_path=os.fspath(folder),
        commit_message=commit_message,
        commit_description=commit_description,
        create_pr=create_pr,
        revision=revision,
        ignore_patterns=ignore_patterns,
    )
