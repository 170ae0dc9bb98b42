"""An HTTPS upstream for the proxy tests: answers every request with what it received (method,
path, headers; of ``Authorization`` only its SHA-256, so what reads the answer never sees a secret)
as JSON, over TLS with a certificate of its own CA.

``python3 -m tests.proxy_upstream CERT KEY ADDRESS PORT [PORT...]`` (run inside the test's upstream
namespace); ports 80 and 8080 serve plain HTTP.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def auth_digest(value: str) -> str:
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()


class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no delayed-ACK stall between them

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        size = int(self.headers.get("X-Size") or 0)  # a large answer, for the throughput bench
        if size:
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            chunk = b"x" * 65536
            while size > 0:
                self.wfile.write(chunk[:size])
                size -= len(chunk)
            return
        headers = dict(self.headers.items())
        if "Authorization" in headers:  # the credential's digest only: the guest reading this must not see it
            headers["Authorization"] = auth_digest(headers["Authorization"])
        doc = {"method": self.command, "path": self.path, "headers": headers,
               "body_bytes": len(body), "port": self.server.server_address[1]}
        out = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _answer

    def log_message(self, *args: object) -> None:
        pass


def serve(cert: str, key: str, address: str, port: int) -> None:
    server = ThreadingHTTPServer((address, port), Echo)
    if port not in (80, 8080):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    server.serve_forever()


def main() -> None:
    cert, key, address, *ports = sys.argv[1:]
    threads = [threading.Thread(target=serve, args=(cert, key, address, int(p)), daemon=True) for p in ports]
    for t in threads:
        t.start()
    print("ready", flush=True)
    threads[0].join()


if __name__ == "__main__":
    main()
