"""A local webhook receiver for the notification tests: records every post on 127.0.0.1
and answers with a status the test chooses."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opsgate.demo.processes import LOOPBACK


@dataclass(frozen=True)
class Post:
    path: str
    headers: dict[str, str]
    body: bytes


class WebhookReceiver:
    def __init__(self, port: int = 0, status: int = 200) -> None:
        self.status = status
        self.posts: list[Post] = []
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(min(length, 1_000_000))
                with receiver.arrived:
                    receiver.posts.append(
                        Post(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                    )
                    receiver.arrived.notify_all()
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/hook"

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def wait_for(self, count: int, timeout: float = 30.0, about: str = "") -> list[Post]:
        """At least `count` posts whose body mentions `about` (or AssertionError after
        `timeout`)."""
        needle = about.encode()

        def matching() -> list[Post]:
            return [p for p in self.posts if needle in p.body]

        with self.arrived:
            if not self.arrived.wait_for(lambda: len(matching()) >= count, timeout=timeout):
                raise AssertionError(f"{len(matching())} of {count} posts after {timeout}s")
            return matching()
