"""Credentials in camera URLs never leave the config: `redact` hides them in any text.

Camera sources are often `rtsp://user:password@host/...` or carry `?token=...`. FFmpeg names the
URL in its errors, the watcher logs and stores sources, and the dashboard shows them, so every
one of those paths passes its text through `redact` first. Only the secret is replaced: the
host, path and user name stay readable for the operator.
"""
from __future__ import annotations

import logging
import re

MASK = "***"
SECRET_PARAMETERS = ("password", "passwd", "pwd", "pass", "token", "access_token", "auth",
                     "secret", "key", "apikey", "api_key", "signature", "sig")

# scheme://user:secret@  (the secret may contain anything but '@', '/' and whitespace)
_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@?#]*:)(?P<secret>[^\s/@]+)@")
_REFERENCE = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}")  # a default (${X:-...}) is masked
_PARAMETER = re.compile(
    r"(?P<head>[?&;](?:" + "|".join(SECRET_PARAMETERS) + r")=)(?P<secret>[^&#\s'\"]+)",
    re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with URL passwords and secret query parameters replaced by `***` (a `${VAR}`
    reference is kept: it names where the secret lives, not the secret)."""
    def hide(match: re.Match, tail: str = "") -> str:
        secret = match["secret"]
        kept = secret if _REFERENCE.fullmatch(secret) else MASK
        return f"{match['head']}{kept}{tail}"

    text = _USERINFO.sub(lambda m: hide(m, "@"), text)
    return _PARAMETER.sub(hide, text)


def redact_value(value):
    """`redact` applied to every string inside nested dicts, lists and tuples (a stored config)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(item) for item in value)
    return value


class RedactingFilter(logging.Filter):
    """A log handler filter that redacts each record's final message (arguments included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        hidden = redact(message)
        if hidden != message:
            record.msg, record.args = hidden, None
        return True


def log_with_redaction(level: int | str, fmt: str) -> None:
    """`logging.basicConfig` whose handlers hide credentials in every record."""
    logging.basicConfig(level=level, format=fmt)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
