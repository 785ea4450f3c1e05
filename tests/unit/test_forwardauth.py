"""The gateway's forward_auth server on a loopback socket: what Caddy sends, what it gets back."""

import asyncio

from agent.adapters import forwardauth


def run(verify, *requests: bytes, read_until_close: bool = False, ask=None) -> bytes:
    async def main() -> bytes:
        server = await forwardauth.serve(verify, "127.0.0.1", 0, ask=ask)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for request in requests:
                writer.write(request)
            await writer.drain()
            if read_until_close:
                data = await asyncio.wait_for(reader.read(), 5)
            else:
                data = b""
                while data.count(b"HTTP/1.1 ") < len(requests) or not data.endswith((b"}", b"\r\n\r\n")):
                    chunk = await asyncio.wait_for(reader.read(65536), 5)
                    if not chunk:
                        break
                    data += chunk
            writer.close()
            return data
        finally:
            server.close()

    return asyncio.run(main())


def request(host: str = "p.example", authorization: str = "Bearer t", method: str = "GET",
            extra: str = "") -> bytes:
    return (f"{method} /auth HTTP/1.1\r\nHost: {host}\r\nAuthorization: {authorization}\r\n"
            f"X-Forwarded-Method: POST\r\n{extra}\r\n").encode()


def test_each_request_on_a_kept_connection_gets_the_verdict_for_its_own_headers():
    seen = []

    def verify(host, method, authorization):
        seen.append((host, method, authorization))
        if authorization == "Bearer good":
            return 200, {"X-Flux-Authorization": "Bearer minted", "X-Flux-Profile": "t_api"}, None
        return 401, {"WWW-Authenticate": "Bearer"}, {"error": "invalid token"}

    data = run(verify, request(authorization="Bearer good"), request(host="q.example", authorization="Bearer bad"))
    first, second = data.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200 OK\r\n") and b"X-Flux-Authorization: Bearer minted\r\n" in first
    assert b"Content-Length: 0\r\n" in first
    assert second.startswith(b"401 Unauthorized\r\n") and second.endswith(b'{"error": "invalid token"}')
    # The method Caddy forwards is the one decided on, not the subrequest's own.
    assert seen == [("p.example", "POST", "Bearer good"), ("q.example", "POST", "Bearer bad")]


def test_a_malformed_request_gets_400_and_the_connection_closes():
    data = run(lambda *a: (200, {}, None), b"NOT HTTP AT ALL\r\n\r\n", read_until_close=True)
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"Connection: close" in data


def test_a_header_block_over_the_limit_is_refused():
    huge = "X-Big: " + "a" * (forwardauth.MAX_HEADER_BYTES + 1) + "\r\n"
    data = run(lambda *a: (200, {}, None), request(extra=huge), read_until_close=True)
    assert data.startswith(b"HTTP/1.1 400 ")


def test_a_verdict_that_fails_is_a_500_and_the_server_goes_on():
    calls = []

    def verify(host, method, authorization):
        calls.append(authorization)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return 200, {}, None

    data = run(verify, request(), request())
    first, second = data.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"500 ") and b"boom" not in first
    assert second.startswith(b"200 ")


def test_a_header_value_with_a_line_break_is_left_out():
    data = run(lambda *a: (200, {"X-Flux-Profile": "a\r\nX-Injected: 1", "X-Ok": "yes"}, None), request())
    assert b"X-Injected" not in data and b"X-Ok: yes\r\n" in data


def test_a_client_that_asks_to_close_is_closed_after_its_answer():
    data = run(lambda *a: (200, {}, None), request(extra="Connection: close\r\n"), read_until_close=True)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close\r\n" in data


def test_caddy_asks_whether_a_host_may_have_a_certificate_and_forward_auth_still_verifies():
    def verify(host, method, authorization):
        return 200, {"X-Flux-Authorization": "Bearer minted"}, None

    answers = run(verify, b"GET /ask?domain=shop.example.com HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                  b"GET /ask?domain=evil.example HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                  b"GET /ask HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                  request(host="shop.example.com"),
                  ask=lambda domain: domain == "shop.example.com")
    replies = answers.split(b"HTTP/1.1 ")[1:]
    assert [r.split(b" ", 1)[0] for r in replies] == [b"200", b"404", b"404", b"200"]
    assert b'"allowed": true' in replies[0] and b'"domain": "evil.example"' in replies[1]
    # Only the forward_auth answer carries a token.
    assert b"X-Flux-Authorization: Bearer minted" in replies[3] and b"X-Flux-Authorization" not in replies[0]
