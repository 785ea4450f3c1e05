"""sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET."""

import os
import socket


def notify(state: str) -> bool:
    """Sends e.g. "READY=1"; False when not run by systemd with Type=notify."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(state.encode())
    return True
