#!/usr/bin/env python3
"""A deliberately misbehaving OpenAI-compatible server for the remote-backend
error tests (the happy path uses the real llama-server). The request's
`model` field picks the behaviour:

  ok         streams three tokens and [DONE]
  status500  HTTP 500 with a JSON error body
  status400  HTTP 400 with a JSON error body
  malformed  HTTP 200, then a line that is not server-sent events
  badjson    HTTP 200, then `data:` with broken JSON
  close      HTTP 200, two tokens, then the connection closes mid-answer
  slow       HTTP 200, one token, then nothing for 30 s
  auth       every path answers 401

Usage: stub_openai.py PORT (0 = any); prints "ready PORT" when listening.
"""
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def chunk(text, finish=None):
    return "data: " + json.dumps(
        {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}
    ) + "\n\n"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send_body(self, status, body, ctype="application/json"):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def start_stream(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def write(self, text):
        self.wfile.write(text.encode())
        self.wfile.flush()

    def do_GET(self):
        if "auth" in self.server.modes:
            return self.send_body(401, '{"error":{"message":"bad key"}}')
        self.send_body(200, json.dumps({"object": "list", "data": [{"id": "stub"}]}))

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        req = json.loads(self.rfile.read(length) or b"{}")
        mode = req.get("model", "ok")
        if mode in ("status500", "status400"):
            code = int(mode[-3:])
            return self.send_body(code, json.dumps({"error": {"message": f"stub says {code}"}}))
        if mode == "auth":
            return self.send_body(401, '{"error":{"message":"bad key"}}')
        self.start_stream()
        if mode == "ok":
            for t in ["Hello", " there", " friend"]:
                self.write(chunk(t))
            self.write(chunk("", "stop"))
            self.write("data: [DONE]\n\n")
        elif mode == "malformed":
            self.write(chunk("Hi"))
            self.write("this is not an event stream\n\n")
        elif mode == "badjson":
            self.write("data: {\"choices\": [\n\n")
        elif mode == "close":
            self.write(chunk("Half"))
            self.write(chunk(" an"))
        elif mode == "slow":
            self.write(chunk("Wait"))
            time.sleep(30)


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    srv = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    srv.daemon_threads = True
    srv.modes = set(sys.argv[2:])
    print(f"ready {srv.server_address[1]}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
