"""Ports chosen for servers that start later lie outside the range outgoing connections take theirs from."""

import collections
import socket

from agent.adapters import ports


def test_a_chosen_port_lies_below_the_range_of_outgoing_connections_and_is_free():
    low = ports.ephemeral_low()
    chosen = {ports.free_port() for _ in range(50)}
    assert all(ports.LOWEST <= port < low for port in chosen), sorted(chosen)
    # Spread out, so that two servers started together seldom pick the same port.
    assert len(chosen) > 40
    for port in list(chosen)[:5]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_something_listens_on_is_passed_over(monkeypatch):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        taken = busy.getsockname()[1]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            other = probe.getsockname()[1]
        monkeypatch.setattr(ports.random, "sample", lambda population, k: [taken, other])
        assert ports.free_port() == other


def test_ports_asked_for_before_any_is_bound_are_all_different(monkeypatch):
    # A fleet chooses all its ports, then starts its servers: the same free port twice would
    # make one of them fail with "address already in use".
    order = list(range(ports.LOWEST, ports.LOWEST + ports.TRIES))
    monkeypatch.setattr(ports.random, "sample", lambda population, k: order)
    monkeypatch.setattr(ports, "_recent", collections.deque(maxlen=1024), raising=False)
    chosen = [ports.free_port() for _ in range(12)]
    assert len(set(chosen)) == 12, chosen
