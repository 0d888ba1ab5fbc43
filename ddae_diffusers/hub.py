"""Uploads to the Hugging Face Hub: one helper on ``huggingface_hub``'s public API for every folder we push.

Callers write the folder first, model card (``README.md``) included, then push it as it is. That is why the
classifier and the pipeline override ``push_to_hub``: transformers' and diffusers' own versions write a
generic card over ours.
"""

from __future__ import annotations

import os

from huggingface_hub import CommitInfo, HfApi


def create_hub_repo(repo_id: str, token: str | None = None, private: bool | None = None) -> str:
    """Creates ``repo_id`` if needed (a no-op when it exists); returns its full id (``owner/name``)."""
    return HfApi(token=token).create_repo(repo_id, private=private, exist_ok=True).repo_id


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
