"""Dump files at rest, in the format of formats/sealedfile.py, and the data key a job brings."""

import base64
import binascii

from contract.failures import FailureKind
from formats.sealedfile import (CHUNK_BYTES, HEADER_BYTES, KEY_BYTES, TAG_BYTES, DumpFileError,  # noqa: F401
                                 EncryptingWriter, decrypt, read_sql)

from ..errors import AgentError


def parse_key(value, name: str = "dump_key") -> bytes:
    """The data key of a job's params (base64 of 32 bytes). The value is never echoed."""
    try:
        key = base64.b64decode(value, validate=True) if isinstance(value, str) else b""
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise AgentError(f"a dump needs its data key: {name} must be the base64 of 32 bytes "
                         "(is the controller older than this agent?)", kind=FailureKind.INVALID)
    return key
