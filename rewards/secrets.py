"""Credentials never reach disk: redaction of secret-carrying options, and one way to resolve an API key.

:func:`redact` returns a copy of any (nested) dict/list in which the value of every key that names a
credential (:func:`is_secret_key`: ``api_key``, ``token``, ``password``, ``secret``,
``authorization``, ``credentials``, ``private_key``, ``access_key`` … as the whole key or its last
``_``/``-`` separated words, any case) is replaced by :data:`REDACTED`. The trainer applies it to
everything it writes (``config.json``, each checkpoint's ``state.json``; metrics and TensorBoard hold
numbers only). Keys that merely *name* a secret stay: ``api_key_env`` (the name of an environment
variable) and ``token_file`` are the documented ways to pass one. ``max_tokens`` is not a secret.

:func:`drop_redacted` removes redacted entries again, so a resumed run falls back to
``api_key_env`` / ``OPENAI_API_KEY`` instead of sending the placeholder as a key.

:func:`resolve_api_key` is the one rule every alignment reward follows: an explicit ``api_key``
argument, else the environment variable named by ``api_key_env`` (default ``OPENAI_API_KEY``).
"""

from __future__ import annotations

import os
import re
from typing import Any

REDACTED = "<redacted>"
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"

# A key is secret when it is, or ends with, one of these words (separated by _ or - or camel case).
_SECRET_WORDS = (
    "api_key", "apikey", "token", "access_token", "auth_token", "bearer", "password", "passwd", "passphrase",
    "secret", "client_secret", "authorization", "auth", "credential", "credentials", "private_key",
    "access_key", "secret_key", "session_key", "cookie",
)  # fmt: skip
_SECRET_RE = re.compile(r"(?:^|_)(?:" + "|".join(re.escape(w) for w in _SECRET_WORDS) + r")$")


def _normalise(key: str) -> str:
    key = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key)  # apiKey -> api_Key
    return key.replace("-", "_").lower()


def is_secret_key(key: Any) -> bool:
    """True for option names that carry a credential (``api_key``, ``hf_token``, ``Authorization`` …)."""
    return isinstance(key, str) and bool(_SECRET_RE.search(_normalise(key)))


def redact(obj: Any) -> Any:
    """A copy of ``obj`` with the value of every secret key (at any depth) replaced by :data:`REDACTED`.

    Dicts, lists and tuples are copied; other values are returned as they are. Empty values (``None``,
    ``""``) are kept: they carry nothing, and they say that no key was set.
    """
    if isinstance(obj, dict):
        return {k: (REDACTED if is_secret_key(k) and v not in (None, "") else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(redact(v) for v in obj)
    return obj


def drop_redacted(obj: Any) -> Any:
    """A copy of ``obj`` without the entries :func:`redact` replaced (so defaults apply again)."""
    if isinstance(obj, dict):
        return {k: drop_redacted(v) for k, v in obj.items() if not (is_secret_key(k) and v == REDACTED)}
    if isinstance(obj, list):
        return [drop_redacted(v) for v in obj]
    return obj


def resolve_api_key(api_key: str | None = None, api_key_env: str | None = None) -> str | None:
    """The API key to send: ``api_key`` when given (``""`` means "send none"), else the value of the
    environment variable ``api_key_env`` (default ``OPENAI_API_KEY``), else None.

    An ``api_key_env`` named explicitly but unset is an error (a typo would otherwise send no key and
    fail later with HTTP 401); the default ``OPENAI_API_KEY`` may be unset (local servers need none).
    """
    if api_key is not None:
        if not isinstance(api_key, str):
            raise ValueError(f"api_key is {type(api_key).__name__}; expected a string (better: api_key_env)")
        if api_key == REDACTED:
            raise ValueError(
                f"api_key={REDACTED!r} is the placeholder written instead of a key; set the key in an "
                "environment variable and pass its name as api_key_env"
            )
        return api_key
    if api_key_env is None:
        return os.environ.get(DEFAULT_API_KEY_ENV) or None
    if not isinstance(api_key_env, str) or not api_key_env:
        raise ValueError(f"api_key_env={api_key_env!r}; expected the name of an environment variable")
    value = os.environ.get(api_key_env)
    if not value and api_key_env != DEFAULT_API_KEY_ENV:
        raise ValueError(
            f"api_key_env={api_key_env!r} but ${api_key_env} is not set; expected it to hold the API key "
            "(export it before starting the run)"
        )
    return value or None
