"""Secrets: which environment variables count as secret, and text with their values hidden.

One pattern for the whole kit. The training sandbox gets an allow-listed environment (see
sandbox.py), so these names matter for what the loop *records*: results.tsv, events, logs, the
crash tail an agent is sent, and the environment git and a no-sandbox run see.
"""

from __future__ import annotations

import os
import re

# a variable named like this holds a secret (OPENAI_API_KEY, HF_TOKEN, AWS_SECRET_ACCESS_KEY, ...)
SECRET_NAME_RE = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL|^OPENAI_|^ANTHROPIC_", re.IGNORECASE)
MIN_SECRET_LEN = 8  # shorter values ("1", "true") would redact ordinary words
REDACTED = "<redacted>"


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME_RE.search(name))


def secret_values(environ=None) -> list[str]:
    """The values of secret-named variables, longest first (so a key that contains another goes first)."""
    environ = os.environ if environ is None else environ
    values = {v for k, v in environ.items() if is_secret_name(k) and len(v) >= MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def redact(text: str, values: list[str] | None = None) -> str:
    """`text` with every secret value replaced by <redacted>."""
    for value in secret_values() if values is None else values:
        text = text.replace(value, REDACTED)
    return text


def without_secrets(environ=None) -> dict:
    """A copy of the environment without the secret-named variables."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if not is_secret_name(k)}
