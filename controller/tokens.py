"""API tokens and agent join tokens: generation, format checks and hashing.

Only SHA-256 hashes of tokens are stored; the plain token is shown once.
"""

import hashlib
import re
import secrets

API_TOKEN_PREFIX = "flx_live_"
JOIN_TOKEN_PREFIX = "flx_join_"
_API_TOKEN_RE = re.compile(r"^flx_live_([0-9a-f]{32})_([0-9a-f]{4})$")
_JOIN_TOKEN_RE = re.compile(r"^flx_join_[0-9a-f]{40}$")


def _checksum(body: str) -> str:
    return hashlib.sha256((API_TOKEN_PREFIX + body).encode()).hexdigest()[:4]


def new_api_token() -> str:
    body = secrets.token_hex(16)
    return f"{API_TOKEN_PREFIX}{body}_{_checksum(body)}"


def is_well_formed_api_token(token: str) -> bool:
    match = _API_TOKEN_RE.match(token)
    return bool(match) and secrets.compare_digest(_checksum(match.group(1)), match.group(2))


def new_join_token() -> str:
    return JOIN_TOKEN_PREFIX + secrets.token_hex(20)


def is_well_formed_join_token(token: str) -> bool:
    return bool(_JOIN_TOKEN_RE.match(token))


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
