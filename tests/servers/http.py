"""A plain HTTP server in a thread whose answers the test scripts by path; counts connections."""

import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Answer:
    status: int = 200
    smtp_reply: str | None = None
    delay: float = 0.0
    close_early: bool = False  # drop the connection without answering
    body: bytes = b""
    content_type: str | None = None


@dataclass
class HttpServer:
    port: int
    scheme: str
    answers: dict[str, Answer]
    connections: int = 0
    requests: list[dict[str, list[str]]] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"


@contextmanager
def http_server(answers: dict[str, Answer], tls: ssl.SSLContext | None = None) -> Iterator[HttpServer]:
    state = HttpServer(port=0, scheme="https" if tls else "http", answers=answers)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive unless the client says close

        def setup(self) -> None:
            with lock:
                state.connections += 1
            super().setup()

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            self.rfile.read(length)
            with lock:
                state.requests.append({k: self.headers.get_all(k) or [] for k in self.headers})
            answer = state.answers.get(self.path, Answer(404))
            if answer.delay:
                time.sleep(answer.delay)
            if answer.close_early:
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self.send_response(answer.status)
            if answer.smtp_reply:
                self.send_header("X-Smtp-Reply", answer.smtp_reply)
            if answer.content_type:
                self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            self.wfile.write(answer.body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
