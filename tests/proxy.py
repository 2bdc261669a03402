"""A TCP proxy that injects network faults between the service and a real server.

``FaultProxy(target_port)`` listens on 127.0.0.1:<free port> and forwards to 127.0.0.1:target_port.
It runs its own asyncio loop in a daemon thread, so plain (sync) pytest code drives it; ``mode``
can be changed at any time and the change is in force when the assignment returns.

Modes, and what each imitates:

- ``"pass"``: forward both ways, unchanged: a healthy network.
- ``"refuse"``: a server that is down, or a firewall that REJECTs: every current connection is cut
  with a TCP reset, and each new one is accepted and reset at once (the client fails fast, with
  ECONNRESET rather than ECONNREFUSED: the port must stay ours for "pass" to work again).
- ``"blackhole"``: a network that silently drops packets (a cable pulled, a partition, a firewall
  that DROPs): nothing is forwarded and nothing is closed. New connections are accepted (the
  kernel completes the handshake) and then hear nothing; current connections freeze: the proxy
  stops reading them, so the peer's writes pile up in socket buffers and no reply ever comes.

Back to ``"pass"``, new connections work again; frozen connections stay frozen until ``cut()`` or
``close()``, like flows whose NAT or firewall state was lost during the partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

__all__ = ["FaultProxy", "Mode"]

Mode = Literal["pass", "refuse", "blackhole"]
_MODES: tuple[Mode, ...] = ("pass", "refuse", "blackhole")
_CHUNK = 65536
T = TypeVar("T")


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close with a TCP RST (SO_LINGER 0) rather than a FIN."""
    if writer is None or writer.transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One client connection and, unless it was frozen from the start, its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.frozen = False
        self.done = asyncio.Event()

    def freeze(self) -> None:
        self.frozen = True
        for w in (self.client, self.upstream):
            if w is not None and isinstance(w.transport, asyncio.ReadTransport) and not w.transport.is_closing():
                w.transport.pause_reading()

    def reset(self) -> None:
        _reset(self.client)
        _reset(self.upstream)
        self.done.set()

    def close(self) -> None:
        for w in (self.client, self.upstream):
            if w is not None and not w.transport.is_closing():
                w.close()
        self.done.set()


class FaultProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._mode: Mode = "pass"
        self._links: set[_Link] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"fault-proxy-{target_port}", daemon=True)
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port: int = self._server.sockets[0].getsockname()[1]
        self.accepted = 0  # connections accepted so far, whatever the mode

    @property
    def mode(self) -> Mode:
        return self._mode

    @mode.setter
    def mode(self, mode: Mode) -> None:
        if mode not in _MODES:
            raise ValueError(f"unknown mode {mode!r}; known: {', '.join(_MODES)}")
        self._call(self._set_mode(mode))

    @property
    def connections(self) -> int:
        """Connections currently open through the proxy (frozen ones included)."""
        return len(self._links)

    def cut(self) -> None:
        """Reset every current connection (frozen ones too); the mode stays as it is."""
        self._call(self._cut())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- on the proxy's loop ------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def _refusing(self) -> bool:
        return self._mode == "refuse"

    async def _set_mode(self, mode: Mode) -> None:
        self._mode = mode
        if mode == "refuse":
            await self._cut()
        elif mode == "blackhole":
            for link in self._links:
                link.freeze()

    async def _cut(self) -> None:
        for link in list(self._links):
            link.reset()

    async def _shutdown(self) -> None:
        self._server.close()
        await self._cut()
        for _ in range(200):  # let the handlers see their resets and end
            if not self._links:
                break
            await asyncio.sleep(0.01)
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in others:
            t.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._mode == "refuse":
            _reset(writer)
            return
        link = _Link(writer)
        self._links.add(link)
        try:
            if self._mode == "blackhole":
                link.freeze()
            else:
                try:
                    up_reader, link.upstream = await asyncio.open_connection(*self.target)
                except OSError:
                    link.reset()  # the server itself refuses: pass that on
                    return
                if self._refusing():  # the mode changed while connecting
                    link.reset()
                    return
                if link.frozen:
                    link.freeze()  # frozen while connecting: freeze the new upstream side too
                else:
                    await asyncio.gather(self._pump(link, reader, link.upstream),
                                         self._pump(link, up_reader, writer))
            await link.done.wait()
        finally:
            self._links.discard(link)

    async def _pump(self, link: _Link, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while not link.frozen and not link.done.is_set():
                data = await src.read(_CHUNK)
                if link.frozen:
                    return  # dropped on the floor; the proxy reads this connection no more
                if not data:
                    break
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            link.reset()
            return
        if not link.frozen:
            link.close()
