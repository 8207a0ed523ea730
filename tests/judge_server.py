"""A scripted OpenAI-compatible judge on 127.0.0.1: the one permitted stand-in (the real judge is a paid API).

The judged text decides the reply: "GOOD" rates 2, "OKAY" rates 1, "MALFORMED" answers without a rating,
"FLAKY" answers 429 to its first two calls, "DOWN" always answers 500, "SLOW" waits before answering.
`server.heal()` makes every later call succeed (for resume tests).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ScriptedJudge:
    def __init__(self):
        self.calls = Counter()
        self.healed = False
        self._lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                if not self.path.endswith("/v1/chat/completions"):
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                text = body["messages"][0]["content"]
                status, reply = judge.respond(text)
                payload = json.dumps(
                    {"id": "x", "object": "chat.completion", "created": 0, "model": body.get("model", "judge"),
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": reply}}]}
                    if status == 200 else {"error": {"message": reply, "type": "server_error", "code": status}}
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def respond(self, text: str) -> tuple[int, str]:
        marker = next((m for m in ("MALFORMED", "FLAKY", "DOWN", "SLOW", "OKAY", "GOOD") if m in text), "GOOD")
        with self._lock:
            self.calls[marker] += 1
            n = self.calls[marker]
        if self.healed:
            return 200, "Fine. Rating: [[2]]"
        if marker == "MALFORMED":
            return 200, "This looks fine to me, I would rate it highly."
        if marker == "FLAKY" and n <= 2:
            return 429, "rate limited"
        if marker == "DOWN":
            return 500, "internal error"
        if marker == "SLOW":
            time.sleep(0.3)
        return 200, f"Explanation. Rating: [[{1 if marker == 'OKAY' else 2}]]"

    def heal(self) -> None:
        self.healed = True

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
