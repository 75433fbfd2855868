"""Text that leaves the process (terminal, logs, params, tags) without credentials in it."""

from __future__ import annotations

import os
import re

_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*):(?P<secret>[^@\s]*)@")
_SECRET_PARAMS = (
    "password|passwd|pwd|pass|token|access_token|auth_token|id_token|refresh_token|secret|"
    "client_secret|api_key|apikey|access_key|secret_key|sig|signature|accountkey|"
    "x-amz-signature|x-amz-credential|x-amz-security-token"
)
_KEY_VALUE = re.compile(
    rf"(?i)(?<![\w-])(?P<head>(?:{_SECRET_PARAMS})\s*=\s*)(?P<secret>[^&;#\s]+)"
)
_SECRET_ENV = re.compile(r"(PASSWORD|PASSWD|TOKEN|SECRET|SECRET_ACCESS_KEY|API_KEY|ACCESS_KEY)$")
_MIN_SECRET_LEN = 4  # shorter env values would blank out ordinary text


def _environment() -> dict[str, str]:
    """A snapshot of the environment. MLflow's telemetry thread sets and unsets a variable
    while a run starts; iterating ``os.environ`` meanwhile raised KeyError mid-iteration."""
    for _ in range(10):
        try:
            return dict(os.environ)
        except (KeyError, RuntimeError):
            continue
    return {}


def redact(text: str) -> str:
    """Hide credentials so URIs and config values can be printed and logged as params/tags."""
    text = _USERINFO.sub(lambda m: f"{m['head']}:***@" if m["secret"] else m[0], text)
    text = _KEY_VALUE.sub(lambda m: f"{m['head']}***", text)
    for name, value in _environment().items():
        if value and len(value) >= _MIN_SECRET_LEN and _SECRET_ENV.search(name.upper()):
            text = text.replace(value, "***")
    return text


def _one_line(err: BaseException) -> str:
    """The useful part of a driver/HTTP error, on one line (no stack trace)."""
    seen = {id(err)}
    while True:  # a driver error wrapped by SQLAlchemy/MLflow says it shortest
        inner = getattr(err, "orig", None) or err.__cause__
        if not isinstance(inner, BaseException) or id(inner) in seen:
            break
        seen.add(id(inner))
        err = inner
    text = str(err) or type(err).__name__
    for pattern in (
        r"\[Errno -?\d+\] [^'\"\)\]]+",  # OS-level: connection refused, name not known
        r"\[SSL[^\]]*\][^()\n]*",  # TLS: certificate verify failed, wrong version
        r"(?i)connect(?:ion)? timed out|read timed out|timeout expired",
    ):
        found = re.search(pattern, text)
        if found:
            return found.group(0).strip().rstrip(".,")
    found = re.search(r"Caused by (\w+)\(", text)
    if found:
        return found.group(1)
    line = " ".join(text.split())
    return redact(line[:300] + ("..." if len(line) > 300 else ""))
