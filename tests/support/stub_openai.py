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
  endless    HTTP 200, a token every 5 ms, never a finish (until 60 s)
  keepalive  HTTP 200, one token, then only keep-alive comments and empty
             deltas every 50 ms (until 60 s)
  drip       HTTP 200, a token every 100 ms (until 60 s)
  bigevent   HTTP 200, then `data:` lines of 1000 bytes with no blank line
             ending the event (until 60 s)
  echokey    HTTP 401 whose body quotes the Authorization header back
  badschema  HTTP 200, JSON that matches no NPC's line schema
  deepjson   HTTP 200, JSON nested 100,000 deep, then [DONE]

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
        if mode == "echokey":
            got = self.headers.get("Authorization", "")
            return self.send_body(
                401, json.dumps({"error": {"message": f"invalid credentials: {got}"}})
            )
        self.start_stream()
        deadline = time.time() + 60
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
        elif mode == "endless":
            while time.time() < deadline:
                self.write(chunk(" more"))
                time.sleep(0.005)
        elif mode == "keepalive":
            self.write(chunk("Hold on"))
            while time.time() < deadline:
                self.write(": keep-alive\n\n")
                self.write(chunk(""))
                self.write('data: {"choices":[{"index":0,"delta":{}}]}\n\n')
                time.sleep(0.05)
        elif mode == "drip":
            while time.time() < deadline:
                self.write(chunk(" drop"))
                time.sleep(0.1)
        elif mode == "bigevent":
            line = "data: " + "x" * 1000 + "\n"
            while time.time() < deadline:
                self.write(line * 64)
        elif mode == "badschema":
            for t in ['{"say": 5, ', '"action": {"Give": {"item": "crown"}}}']:
                self.write(chunk(t))
            self.write(chunk("", "stop"))
            self.write("data: [DONE]\n\n")
        elif mode == "deepjson":
            self.write(chunk("[" * 100000 + "]" * 100000))
            self.write(chunk("", "stop"))
            self.write("data: [DONE]\n\n")


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    srv = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    srv.daemon_threads = True
    srv.modes = set(sys.argv[2:])
    print(f"ready {srv.server_address[1]}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
