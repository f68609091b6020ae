"""URLs as they are recorded (data/raw.json, MLflow params, tags and run names, logs, errors): with
credentials redacted. A password in the user-info and every query value (tokens, signatures) become
"***"; the request itself still uses the URL as given."""

from __future__ import annotations

import urllib.parse

REDACTED = "***"


def redact(text: str) -> str:
    """`text` with the credentials of a URL redacted; anything that is not a URL with a host unchanged."""
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError:
        return text
    if not parts.scheme or not parts.netloc:
        return text
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{REDACTED}@{host}" if ":" in userinfo else f"{REDACTED}@{host}"
    query = "&".join(f"{pair.split('=', 1)[0]}={REDACTED}" if "=" in pair else REDACTED
                     for pair in parts.query.split("&")) if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
