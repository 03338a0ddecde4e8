"""Hub repository ids (`org/name`): checked without importing huggingface_hub, so the
recipe parser can refuse a bad `output.push_to_hub` before anything else runs."""

from __future__ import annotations

import re
from typing import Callable

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


# git check-ref-format's rules for a branch name (the Hub's branches are git refs), plus no
# leading '-' (git refuses it for branches: it would read as an option). Each: (broken?, why).
_REVISION_RULES: list[tuple[Callable[[str], bool], str]] = [
    (lambda r: not r, "it is empty"),
    (lambda r: r.startswith("-"), "it starts with '-'"),
    (lambda r: any(ord(c) < 0x20 or ord(c) == 0x7F for c in r), "it contains a control character"),
    (lambda r: bool(_REF_FORBIDDEN.search(r)), "it contains one of: space ~ ^ : ? * [ \\"),
    (lambda r: ".." in r, "it contains '..'"),
    (lambda r: "@{" in r or r == "@", "it contains '@{' or is '@'"),
    (lambda r: r.startswith("/") or r.endswith("/") or "//" in r, "it starts or ends with '/' or contains '//'"),
    (lambda r: r.endswith("."), "it ends with '.'"),
    (lambda r: any(p.startswith(".") or p.endswith(".lock") for p in r.split("/")),
     "a part between '/' starts with '.' or ends with '.lock'"),
]
_REF_FORBIDDEN = re.compile(r"[ ~^:?*\[\\]")


def revision_problem(revision: str) -> str | None:
    """Why `revision` cannot name a branch (git's ref rules), or None when it can."""
    for broken, why in _REVISION_RULES:
        if broken(revision):
            return f"{revision!r} is not a valid branch name: {why}"
    return None
