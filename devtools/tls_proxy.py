"""Mutual TLS in front of the plaintext broker (Tansu's own TLS listener does not work): certificates
made on the fly, and a TLS-terminating TCP proxy that requires a client certificate.

The proxy runs an asyncio loop in a daemon thread. `drop_connections(seconds)` cuts every connection and
refuses new ones for a while, to simulate a broker outage; `refuse_clients(suffix)` turns away, until
`admit_clients(suffix)`, only new connections whose first request carries a client id ending in
`suffix` (the kernel's producer is "<client id>-producer"): one client fails while the others go on.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography.hazmat.primitives import serialization


def base64_lines(data: bytes) -> str:
    """What `base64` prints on Linux: wrapped at 76 characters."""
    text = base64.b64encode(data).decode()
    return "\n".join(text[i : i + 76] for i in range(0, len(text), 76))


@dataclass
class Pki:
    """A CA, the broker's certificate (127.0.0.1, localhost) and a client certificate; the CA and the
    client's certificate and key are also written as PEM files into `directory`, for other clients.
    The broker also trusts client certificates of a second CA, `client_ca`, as clusters do that sign
    their clients with a CA of their own."""

    ca: trustme.CA
    server: trustme.LeafCert
    client: trustme.LeafCert
    directory: Path
    client_ca: trustme.CA

    @classmethod
    def create(cls, directory: Path) -> Pki:
        ca = trustme.CA()
        pki = cls(ca, ca.issue_cert("127.0.0.1", "localhost"), ca.issue_cert("kernel-client"), directory, trustme.CA())
        ca.cert_pem.write_to_path(str(pki.ca_file))
        pki.client.cert_chain_pems[0].write_to_path(str(pki.client_cert_file))
        pki.client.private_key_pem.write_to_path(str(pki.client_key_file))
        pki.client_key_file.chmod(0o600)
        return pki

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def client_cert_file(self) -> Path:
        return self.directory / "client.pem"

    @property
    def client_key_file(self) -> Path:
        return self.directory / "client.key"

    @property
    def env(self) -> dict[str, str]:
        """The kernel's three certificate variables, base64-encoded as a user pastes them in production."""
        return {
            "KAFKA_CA_CERT": base64_lines(self.ca.cert_pem.bytes()),
            "KAFKA_CLIENT_CERT": base64_lines(self.client.cert_chain_pems[0].bytes()),
            "KAFKA_CLIENT_KEY": base64_lines(self.client.private_key_pem.bytes()),
        }

    def broker_files(self) -> tuple[Path, Path]:
        """The broker's key and certificate chain in one PEM file (the key as PKCS#8, which Apache Kafka's
        PEM key store requires), and the CAs it trusts for client certificates: for Apache Kafka's own TLS.
        Its certificate names 127.0.0.1 only, so that "localhost" is a name it does not carry."""
        leaf = self.ca.issue_cert("127.0.0.1")
        key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
        pkcs8 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
        keystore, truststore = self.directory / "broker.pem", self.directory / "broker-trusts.pem"
        keystore.write_bytes(pkcs8 + b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
        keystore.chmod(0o600)
        truststore.write_bytes(self.ca.cert_pem.bytes() + self.client_ca.cert_pem.bytes())
        return keystore, truststore

    def server_context(self) -> ssl.SSLContext:
        """The proxy's side: the broker's certificate, and a client certificate signed by one of the CAs required."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.verify_mode = ssl.CERT_REQUIRED
        self.ca.configure_trust(context)
        self.client_ca.configure_trust(context)
        self.server.configure_cert(context)
        return context


class TlsProxy:
    """Listens on `listen_port` of 127.0.0.1 and 127.0.0.2 (TLS with `context`, plain TCP with None) and
    forwards to `target`: a port on 127.0.0.1, or the path of a Unix socket (the tests' PostgreSQL)."""

    def __init__(self, listen_port: int, target: int | Path, context: ssl.SSLContext | None):
        self.listen_port = listen_port
        self.target = target
        self.context = context
        self.refuse_until = 0.0  # time.monotonic(); connections before then are closed at once
        self.refused_clients: set[str] = set()  # client id suffixes
        self.loop = asyncio.new_event_loop()
        self.writers: set[asyncio.StreamWriter] = set()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tls-proxy", daemon=True)

    def start(self) -> TlsProxy:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self.loop).result(timeout=10)
        return self

    async def _listen(self) -> None:
        # 127.0.0.2 is also served: its name is not in the broker's certificate (hostname checks).
        self.server = await asyncio.start_server(
            self._serve, ["127.0.0.1", "127.0.0.2"], self.listen_port, ssl=self.context
        )

    async def _serve(self, client_reader, client_writer) -> None:
        if time.monotonic() < self.refuse_until:
            client_writer.close()
            return
        try:
            if isinstance(self.target, int):
                broker_reader, broker_writer = await asyncio.open_connection("127.0.0.1", self.target)
            else:
                broker_reader, broker_writer = await asyncio.open_unix_connection(self.target)
        except OSError:
            client_writer.close()
            return
        self.writers.update((client_writer, broker_writer))
        if not await self._admit(client_reader, broker_writer):
            for writer in (client_writer, broker_writer):
                writer.transport.abort()
            self.writers.difference_update((client_writer, broker_writer))
            return
        try:
            await asyncio.gather(
                self._pipe(client_reader, broker_writer), self._pipe(broker_reader, client_writer)
            )
        except asyncio.CancelledError:
            pass  # stop(): end quietly (Python 3.11's streams log a cancelled connection task as an error)
        self.writers.difference_update((client_writer, broker_writer))

    async def _admit(self, client_reader, broker_writer) -> bool:
        """Read the connection's first request; pass it on unless its client id is refused."""
        if not self.refused_clients:
            return True
        try:
            size = await client_reader.readexactly(4)
            request = await client_reader.readexactly(int.from_bytes(size, "big"))
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
            return False
        # Request header: api_key int16, api_version int16, correlation_id int32, client_id string.
        length = int.from_bytes(request[8:10], "big", signed=True)
        client_id = request[10 : 10 + length].decode(errors="replace") if length > 0 else ""
        if any(client_id.endswith(suffix) for suffix in self.refused_clients):
            return False
        broker_writer.write(size + request)
        return True

    @staticmethod
    async def _pipe(reader, writer) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def drop_connections(self, seconds: float) -> None:
        """Close every open connection and refuse new ones for `seconds`."""

        def drop():
            self.refuse_until = time.monotonic() + seconds
            for writer in list(self.writers):
                writer.transport.abort()

        self.loop.call_soon_threadsafe(drop)

    def refuse_clients(self, suffix: str) -> None:
        """Turn away new connections of clients whose id ends in `suffix`."""
        self.refused_clients.add(suffix)

    def admit_clients(self, suffix: str) -> None:
        self.refused_clients.discard(suffix)

    def stop(self) -> None:
        async def close():
            self.server.close()
            for writer in list(self.writers):
                writer.transport.abort()
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
