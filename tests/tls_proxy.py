"""A TLS-terminating TCP proxy that requires a client certificate, in front of the plaintext broker.

Runs an asyncio loop in a daemon thread. `drop_connections(seconds)` cuts every connection and
refuses new ones for a while, to simulate a broker outage.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time


class TlsProxy:
    def __init__(self, listen_port: int, target_port: int, context: ssl.SSLContext):
        self.listen_port = listen_port
        self.target_port = target_port
        self.context = context
        self.refuse_until = 0.0  # time.monotonic(); connections before then are closed at once
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
            broker_reader, broker_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            return
        self.writers.update((client_writer, broker_writer))
        await asyncio.gather(
            self._pipe(client_reader, broker_writer), self._pipe(broker_reader, client_writer)
        )
        self.writers.difference_update((client_writer, broker_writer))

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
