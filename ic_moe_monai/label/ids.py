"""Ids that MONAI Label's clients send (image ids, label ids and tags), checked before they become file names."""

from __future__ import annotations

from fastapi import HTTPException

__all__ = ["check_id"]


def check_id(value: str | None, what: str) -> None:
    """Refuse (HTTP 422) an id with a path separator, a parent reference or a control byte: ids become file names in
    the datastore's folders. An empty id is left to the caller."""
    if not value:
        return
    text = str(value)
    if "/" in text or "\\" in text or ".." in text or any(ord(c) < 32 for c in text):
        raise HTTPException(status_code=422, detail=f"{what} {text!r} is not allowed: it must not contain path "
                            "separators, '..' or control characters.")  # fmt: skip
