"""A real HTTP server on loopback for the download tests."""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LoopbackServer:
    """A real HTTP server on 127.0.0.1 (a free port), serving each route with a behaviour:

    ok        200 with the body
    truncated declares a Content-Length larger than the body, sends the body, then closes
    reset     sends half the body, then resets the connection (RST)
    stall     sends half the body, then goes silent until the test ends
    silent    accepts the request and never answers
    error     500 Internal Server Error
    nolength  200 with the body but no Content-Length (the end is where the connection closes)
    trickle   200 without Content-Length, then one byte of the body every 0.3 s
    redirect  302 to the URL given as the body
    held      waits until the test releases the server, then 200 with the body (JSON); `answered`
              says, per request, whether the client was still there to take the answer
    A route given without a query also answers that path with any query.
    With `tls` (an ssl.SSLContext holding a certificate) it serves https.
    Anything not routed is a 404. `requests` lists the paths asked for (with their query), in order,
    and `authorizations` their Authorization headers.
    """

    def __init__(self, tls: ssl.SSLContext | None = None):
        self.routes: dict[str, tuple[str, bytes]] = {}
        self.requests: list[str] = []
        self.authorizations: list[str | None] = []
        self.answered: list[bool] = []
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(self.path)
                server.authorizations.append(self.headers.get("Authorization"))
                mode, body = server.routes.get(self.path) or server.routes.get(self.path.split("?")[0], ("missing", b""))
                if mode == "missing":
                    self.send_error(404, "Not Found")
                    return
                if mode == "error":
                    self.send_error(500, "Internal Server Error")
                    return
                if mode == "silent":
                    server.release.wait(60)
                    return
                if mode == "held":
                    server.release.wait(60)
                    try:
                        self.send_response(200)
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body)
                        self.wfile.flush()
                        server.answered.append(True)
                    except OSError:  # the client hung up before the answer
                        server.answered.append(False)
                    return
                if mode == "redirect":
                    self.send_response(302)
                    self.send_header("Location", body.decode())
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if mode in ("nolength", "trickle"):
                    self.send_response(200)
                    self.end_headers()
                    if mode == "nolength":
                        self.wfile.write(body)
                        return
                    for i in range(len(body)):
                        self.wfile.write(body[i:i + 1])
                        self.wfile.flush()
                        if server.release.wait(0.3):
                            return
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body) + (4096 if mode == "truncated" else 0)))
                self.end_headers()
                if mode in ("ok", "truncated"):
                    self.wfile.write(body)
                    return
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                if mode == "stall":
                    server.release.wait(60)
                elif mode == "reset":
                    time.sleep(0.2)  # let the client get into the body first
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.rfile.close()  # drop the makefile reference so close() really closes: RST
                    self.connection.close()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.scheme = "http"
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.httpd.server_port}{path}"

    def serve(self, path: str, body: bytes = b"", mode: str = "ok") -> str:
        self.routes[path] = (mode, body)
        return self.url(path)

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
