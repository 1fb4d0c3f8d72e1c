"""A TCP forwarder for tests: reach a server from another address, or cut it off."""

from __future__ import annotations

import contextlib
import socket
import threading


class PausableProxy:
    """A TCP forwarder to a server, on an address of its own; it can be taken away
    (every connection cut, new ones refused) and brought back."""

    def __init__(self, target: tuple[str, int], address: str = "127.0.0.1") -> None:
        self.target = target
        self.address = address
        self.port = free_port(address)
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.up()

    def up(self) -> None:
        self._listener = socket.create_server((self.address, self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def down(self) -> None:
        assert self._listener is not None
        self._listener.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


_handed_out: set[int] = set()


def free_port(address: str = "127.0.0.1") -> int:
    """A port free now and never handed out before by this process: once its probe socket
    closed, the kernel may offer the same port again, and a test that asks for five ports
    for five servers must get five."""
    while True:
        with socket.socket() as s:
            s.bind((address, 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
