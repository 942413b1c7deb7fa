"""HTTP/1.1 over a raw socket, for tests of the connection layer: what a client library would hide (pipelining,
a head or body sent in pieces, what the server sends before it closes) is what they check."""

from __future__ import annotations

import socket
import time

from tests.procfile import Service


def connect(service: Service) -> socket.socket:
    return socket.create_connection(("127.0.0.1", service.port), timeout=5)


def request(method: str, path: str, body: bytes = b"", *extra: bytes, version: bytes = b"1.1") -> bytes:
    head = [f"{method} {path} HTTP/".encode() + version, b"Host: x", *extra]
    if body or method == "POST":
        head += [b"Content-Type: application/json", b"Content-Length: %d" % len(body)]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def responses(sock: socket.socket, count: int, timeout: float = 5.0) -> list[bytes]:
    """The first `count` responses on the connection (each has a Content-Length), or fewer if it closes first."""
    sock.settimeout(timeout)
    buffer, found = b"", []
    while len(found) < count:
        head, sep, rest = buffer.partition(b"\r\n\r\n")
        if sep:
            length = int(headers(head).get("content-length", 0))
            if len(rest) >= length:
                found.append(head + sep + rest[:length])
                buffer = rest[length:]
                continue
        chunk = sock.recv(65536)
        if not chunk:
            break
        buffer += chunk
    return found


def until_closed(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    sock.settimeout(timeout)
    started = time.monotonic()
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received, time.monotonic() - started


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def headers(answer: bytes) -> dict[str, str]:
    """The answer's header fields, names in lower case."""
    lines = answer.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")[1:]
    return {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}


def body(answer: bytes) -> bytes:
    return answer.partition(b"\r\n\r\n")[2]
