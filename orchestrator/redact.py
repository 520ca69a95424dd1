"""Scrub secrets from free text before it is stored or shown (failure reasons, backend details,
recipe error messages). Specs hold no secrets by design; this is the belt to that brace."""
from __future__ import annotations

import re

MASK = "***"

# NAME=value / NAME: value where NAME looks like a credential variable (HF_TOKEN, AWS_SECRET_ACCESS_KEY,
# WANDB_API_KEY, DB_PASSWORD, ...). The keyword must end the name or be followed by `_...`, so
# `tokens=512` or `max_tokens: 8` are left alone.
_ASSIGNMENT = re.compile(
    r"""(?P<name>\b[A-Za-z0-9_]*(?:TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIALS?)(?:_[A-Za-z0-9]+)*\b)"""
    r"""(?P<sep>\s*[=:]\s*)(?P<quote>['"]?)(?P<value>[^\s'",;}]+)""",
    re.IGNORECASE,
)
# Well-known credential shapes, wherever they appear.
_SHAPES = (
    re.compile(r"\bhf_[A-Za-z0-9]{20,}"),                 # Hugging Face token
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),         # AWS access key id
    re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"),               # OpenAI-style API key
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"),          # GitHub token
    re.compile(r"\bxox[abpr]-[A-Za-z0-9-]{10,}"),         # Slack token
)
_BEARER = re.compile(r"(?i)\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]{8,}")
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://[^:/@\s]+):[^@\s/]+@", re.IGNORECASE)


def redact(text: str) -> str:
    """The text with credential values replaced by ***; the variable names stay, so the message
    still says what was wrong."""
    if not text:
        return text
    out = _ASSIGNMENT.sub(lambda m: f"{m['name']}{m['sep']}{m['quote']}{MASK}", text)
    out = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}:{MASK}@", out)
    out = _BEARER.sub(lambda m: f"{m.group(1)} {MASK}", out)
    for shape in _SHAPES:
        out = shape.sub(MASK, out)
    return out
