"""Hub repository ids (`org/name`): checked without importing huggingface_hub, so the
recipe parser can refuse a bad `output.push_to_hub` before anything else runs."""

from __future__ import annotations

import re

# The Hub's rules (huggingface_hub.utils.validate_repo_id), with the namespace made
# mandatory: a push needs to say whose account or organization receives the model.
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.\-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"^{_PART}/{_PART}$")


def repo_id_problem(repo_id: str) -> str | None:
    """Why `repo_id` cannot name a Hub model repository, or None when it can."""
    if not _REPO_ID.match(repo_id):
        return (
            f"'{repo_id}' is not a Hub repo id of the form org/name (letters, digits, '-', '_', '.';"
            " each part at most 96 characters, not starting or ending with '-' or '.')"
        )
    if "--" in repo_id or ".." in repo_id:
        return f"'{repo_id}' is not a valid Hub repo id: '--' and '..' are not allowed"
    if repo_id.endswith(".git"):
        return f"'{repo_id}' is not a valid Hub repo id: it cannot end with '.git'"
    return None
