"""URLs as they may be shown: a password in a storage or tracking URL never reaches a message,
a log line, a printed link or a generated report."""

from __future__ import annotations

import re

_QUERY_PASSWORD = re.compile(r"([?&](?:password|passwd|pwd)=)[^&#]*", re.IGNORECASE)


def redacted(url: str) -> str:
    """``url`` with everything between ``user:`` and the host's ``@``, and the value of a
    ``password=`` query parameter, as ``***``: messages end up in logs. Not parsed (a malformed
    URL is what errors are about): the last ``@`` ends the credentials, so a password holding
    ``@``, ``:``, ``/`` or ``?`` is hidden whole (more is hidden if the query holds an ``@``)."""
    url = _QUERY_PASSWORD.sub(r"\1***", url)
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in credentials:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
