"""A bare SMTP/LMTP server whose whole conversation a test writes: for servers that misbehave
in ways no real server can be told to (odd codes, slow reading, partial LMTP replies)."""

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


class Conversation:
    """One connection, spoken line by line from the server's side."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.stream = sock.makefile("rb")

    def send(self, *lines: str) -> None:
        self.sock.sendall("".join(f"{line}\r\n" for line in lines).encode())

    def command(self) -> str:
        return self.stream.readline().decode(errors="replace").rstrip("\r\n")

    def expect(self, verb: str, reply: str) -> str:
        """Read one command, which must start with `verb`, and answer `reply`."""
        line = self.command()
        if not line.upper().startswith(verb):
            raise AssertionError(f"expected {verb}, got {line!r}")
        self.send(reply)
        return line

    def greet_and_take_envelope(self, recipients: int, *, lmtp: bool = False) -> None:
        self.send("220 raw.test ESMTP")
        self.expect("LHLO" if lmtp else "EHLO", "250-raw.test\r\n250 8BITMIME")
        self.expect("MAIL", "250 2.1.0 OK")
        for _ in range(recipients):
            self.expect("RCPT", "250 2.1.5 OK")

    def read_data(self, *, delay: float = 0.0, chunk: int = 65536) -> tuple[int, bool]:
        """Read the message, slowly if `delay`; (bytes read, whether the final "." came)."""
        total, tail = 0, b""
        while True:
            if delay:
                time.sleep(delay)
            try:
                data = self.stream.read1(chunk)
            except ConnectionResetError:  # the client aborted
                return total, False
            if not data:
                return total, False
            total += len(data)
            tail = (tail + data)[-5:]
            if tail.endswith(b"\r\n.\r\n"):
                return total, True


@dataclass
class RawServer:
    port: int
    connections: int = 0
    most_at_once: int = 0
    data_received: list[tuple[int, bool]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    _open: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)


@contextmanager
def raw_server(handler: Callable[[Conversation, RawServer], None]) -> Iterator[RawServer]:
    """Each connection runs `handler` in its own thread; the socket closes when it returns."""
    listener = socket.create_server(("127.0.0.1", 0))
    server = RawServer(port=listener.getsockname()[1])
    stopping = threading.Event()

    def serve(sock: socket.socket) -> None:
        with server._lock:
            server.connections += 1
            server._open += 1
            server.most_at_once = max(server.most_at_once, server._open)
        try:
            handler(Conversation(sock), server)
        except (OSError, AssertionError) as exc:
            if not stopping.is_set():
                server.errors.append(exc)
        finally:
            sock.close()
            with server._lock:
                server._open -= 1

    def accept() -> None:
        while not stopping.is_set():
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(sock,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stopping.set()
        listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        listener.close()
        thread.join(5)
