"""gRPC's own floor: the RSS of a bare grpc.aio server holding N mutual-TLS bidirectional
streams, each on its own connection, with the controller's Fleet server options and nothing of
the controller (no catalog, no API, no sessions). What the controller holds above it is its own.

    python bench/grpc_floor.py [--connections 5000] [--workers 4]

`bench/fleet.py --grpc-floor` measures it in the same run as the controller, for the ratio.
The last line of output is one JSON object with the figures.
"""

import argparse
import asyncio
import datetime
import json
import multiprocessing
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SERVER_NAME = "flux-floor"
METHOD = "/floor.Floor/Stream"
BATCH = 50  # streams a worker opens at once


def _pems() -> dict:
    """A CA, a server and one client certificate (P-256, as the controller issues), in PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(name, issuer=None, ca=False):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (x509.CertificateBuilder().subject_name(subject)
                   .issuer_name(issuer[1] if issuer else subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        cert = builder.sign(issuer[0] if issuer else key, hashes.SHA256())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return key, subject, key_pem, cert.public_bytes(serialization.Encoding.PEM)

    ca_key, ca_subject, _, ca_pem = issue("flux-floor-ca", ca=True)
    _, _, server_key, server_pem = issue(SERVER_NAME, (ca_key, ca_subject))
    _, _, client_key, client_pem = issue("floor-agent", (ca_key, ca_subject))
    return {"ca": ca_pem, "server_key": server_key, "server": server_pem,
            "client_key": client_key, "client": client_pem}


def _rss_mb(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _server(pems: dict, port_out, stop) -> None:
    import grpc

    from controller.rpc.server import FLEET_OPTIONS

    async def stream(requests, context):
        async for _ in requests:
            yield b"ok"

    async def main():
        server = grpc.aio.server(options=FLEET_OPTIONS)
        handler = grpc.method_handlers_generic_handler(
            "floor.Floor", {"Stream": grpc.stream_stream_rpc_method_handler(stream)})
        server.add_generic_rpc_handlers((handler,))
        credentials = grpc.ssl_server_credentials([(pems["server_key"], pems["server"])],
                                                  root_certificates=pems["ca"], require_client_auth=True)
        port_out.put(server.add_secure_port("127.0.0.1:0", credentials))
        await server.start()
        while not stop.is_set():
            await asyncio.sleep(0.5)
        await server.stop(None)

    asyncio.run(main())


def _clients(pems: dict, port: int, count: int, opened) -> None:
    import grpc

    async def main():
        held = []

        async def one():
            credentials = grpc.ssl_channel_credentials(pems["ca"], pems["client_key"], pems["client"])
            channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials,
                                              options=[("grpc.ssl_target_name_override", SERVER_NAME)])
            call = channel.stream_stream(METHOD)()
            await call.write(b"hello")
            await call.read()  # the stream is up on both ends
            held.append((channel, call))

        for start in range(0, count, BATCH):
            await asyncio.gather(*(one() for _ in range(min(BATCH, count - start))))
        opened.put(len(held))
        await asyncio.Event().wait()  # held until terminated

    asyncio.run(main())


def measure(connections: int, workers: int = 4, settle_s: float = 5) -> dict:
    """The bare server's RSS with no stream, and with `connections` streams up."""
    spawn = multiprocessing.get_context("spawn")  # no gRPC state carried over from this process
    pems = _pems()
    port_out, opened, stop = spawn.Queue(), spawn.Queue(), spawn.Event()
    server = spawn.Process(target=_server, args=(pems, port_out, stop), daemon=True)
    server.start()
    clients = []
    try:
        port = port_out.get(timeout=60)
        time.sleep(settle_s)
        idle = _rss_mb(server.pid)
        started = time.perf_counter()
        for i in range(workers):
            share = connections // workers + (1 if i < connections % workers else 0)
            clients.append(spawn.Process(target=_clients, args=(pems, port, share, opened), daemon=True))
            clients[-1].start()
        up = sum(opened.get(timeout=600) for _ in clients)
        connect_s = time.perf_counter() - started
        time.sleep(settle_s)
        held = _rss_mb(server.pid)
    finally:
        for proc in clients:
            proc.terminate()
        stop.set()
        server.join(10)
        if server.is_alive():
            server.kill()
    return {"floor_connections": up, "floor_connect_s": round(connect_s, 2),
            "grpc_floor_idle_rss_mb": round(idle, 1), "grpc_floor_rss_mb": round(held, 1),
            "grpc_floor_kb_per_connection": round((held - idle) * 1024 / max(up, 1), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=4, help="client processes the streams are spread over")
    args = parser.parse_args()
    if args.connections < 1 or args.workers < 1:
        parser.error("--connections and --workers must be at least 1")
    figures = measure(args.connections, args.workers)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
