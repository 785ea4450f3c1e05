"""Secrets at rest: AES-256-GCM under the controller's master key.

Sealed values are `v1:<base64(nonce || ciphertext)>`; the associated data binds a
value to where it is stored (for example a project id), so a sealed value copied
to another row does not open.
"""

import base64
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
_NONCE_BYTES = 12
_VERSION = "v1:"


class SecretBoxError(Exception):
    pass


def new_master_key() -> bytes:
    return AESGCM.generate_key(bit_length=KEY_BYTES * 8)


class SecretBox:
    def __init__(self, master_key: bytes):
        if len(master_key) != KEY_BYTES:
            raise SecretBoxError(f"master key must be {KEY_BYTES} bytes, got {len(master_key)}")
        self._aead = AESGCM(master_key)

    def seal(self, plaintext: bytes, context: str) -> str:
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext, context.encode())
        return _VERSION + base64.b64encode(nonce + sealed).decode()

    def open(self, sealed: str, context: str) -> bytes:
        if not sealed.startswith(_VERSION):
            raise SecretBoxError("sealed value has an unknown format")
        raw = base64.b64decode(sealed[len(_VERSION):])
        try:
            return self._aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], context.encode())
        except InvalidTag:
            raise SecretBoxError("sealed value does not open with this master key") from None
