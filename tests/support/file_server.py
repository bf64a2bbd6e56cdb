#!/usr/bin/env python3
"""A file server with faults, for the model-download tests. Serves one file
at every path; the path's first part picks the behaviour:

  /plain/...             200, or 206 for `Range: bytes=N-`
  /missing/...           404
  /drop/N/...            the first request sends N bytes of its body, then
                         closes the connection; later requests as /plain
  /dropnorange/N/...     like /drop, but later requests ignore Range (200, whole file)
  /stall/...             headers and 1000 bytes, then nothing for 60 s
  /slow/BPS/...          like /plain, at most BPS bytes per second
  /bad/...               like /plain, with one byte of the body changed

Every request is logged as one JSON line to LOG: path, Range header, status
and body bytes sent. Usage: file_server.py PORT FILE LOG (PORT 0 = any);
prints "ready PORT" when listening.
"""
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FILE = sys.argv[2]
LOG = sys.argv[3]
SIZE = os.path.getsize(FILE)
dropped = set()
lock = threading.Lock()


def log(entry):
    with lock:
        with open(LOG, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        parts = self.path.strip("/").split("/")
        mode = parts[0]
        rng = self.headers.get("Range")
        entry = {"path": self.path, "range": rng, "status": 0, "sent": 0}
        try:
            self.serve(mode, parts, rng, entry)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            log(entry)

    def serve(self, mode, parts, rng, entry):
        if mode == "missing":
            entry["status"] = 404
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        limit = None
        rate = None
        honour_range = True
        if mode in ("drop", "dropnorange"):
            key = self.path
            with lock:
                first = key not in dropped
                dropped.add(key)
            if first:
                limit = int(parts[1])
            elif mode == "dropnorange":
                honour_range = False
        if mode == "slow":
            rate = int(parts[1])
        start = 0
        if rng and honour_range and rng.startswith("bytes="):
            start = int(rng[len("bytes="):].split("-")[0])
        if start >= SIZE and start > 0:
            entry["status"] = 416
            self.send_response(416)
            self.send_header("Content-Range", "bytes */%d" % SIZE)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        status = 206 if start > 0 else 200
        entry["status"] = status
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, SIZE - 1, SIZE))
        self.send_header("Content-Length", str(SIZE - start))
        self.end_headers()
        with open(FILE, "rb") as f:
            f.seek(start)
            pos = start
            while True:
                chunk = f.read(64 * 1024)
                if not chunk:
                    break
                if mode == "bad" and pos <= SIZE // 2 < pos + len(chunk):
                    i = SIZE // 2 - pos
                    chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1:]
                if mode == "stall" and entry["sent"] >= 1000:
                    time.sleep(60)
                    return
                if mode == "stall":
                    chunk = chunk[: 1000 - entry["sent"]]
                if limit is not None and entry["sent"] + len(chunk) > limit:
                    chunk = chunk[: limit - entry["sent"]]
                    self.wfile.write(chunk)
                    entry["sent"] += len(chunk)
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(chunk)
                entry["sent"] += len(chunk)
                pos += len(chunk)
                if rate:
                    time.sleep(len(chunk) / rate)


server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
server.daemon_threads = True
print("ready", server.server_address[1], flush=True)
server.serve_forever()
