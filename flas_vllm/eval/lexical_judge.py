"""An offline, deterministic stand-in for AxBench's LLM judge, served over the OpenAI chat API.

Why: AxBench's judge is a paid external model. To try the whole pipeline with no
network (the quickstart, CI, a laptop), `flas-vllm eval --local-judge` starts this
server on 127.0.0.1 and the ordinary judge client talks to it exactly as it would
to a real endpoint. Its ratings come from word overlap and repetition, not from
understanding: they are smoke-test numbers, never comparable to AxBench results.

It reads AxBench's own templates (the `[Concept Start]`, `[Instruction Start]` and
`[Sentence Fragment Start]` sections) and answers in their `Rating: [[x]]` format.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

MODEL_NAME = "flas-lexical-judge"

_WORD = re.compile(r"[a-z][a-z']+")
_STOP = frozenset(
    "the a an and or of to in on for with about from into that this these those is are was were be been it its "
    "as at by not no any all some their there them they what which who how why when where your you our can "
    "will would could should may might also more most such than then other using used use related references "
    "terms words phrases mentions concepts concept".split()
)


def _section(text: str, name: str) -> str | None:
    m = re.search(rf"\[{name} Start\]\n?(.*?)\n?\[{name} End\]", text, re.S)
    return m.group(1) if m else None


def _content_words(text: str) -> set[str]:
    """Lower-cased words of 4+ letters minus stop words, with a plural 's' dropped (a crude stem)."""
    words = (w for w in _WORD.findall(text.lower()) if len(w) > 3 and w not in _STOP)
    return {w[:-1] if w.endswith("s") and not w.endswith("ss") else w for w in words}


def overlap_rating(reference: str, sentence: str) -> int:
    """2 if at least half of the reference's content words occur in the sentence, 1 if any does, else 0."""
    ref = _content_words(reference)
    if not ref:
        return 0
    found = len(ref & _content_words(sentence)) / len(ref)
    return 2 if found >= 0.5 else 1 if found > 0 else 0


def fluency_rating(sentence: str) -> int:
    """Penalises what a tiny or over-steered model does: repeated trigrams and non-word tokens."""
    tokens = sentence.split()
    if len(tokens) < 3:
        return 0
    wordlike = sum(bool(re.fullmatch(r"[A-Za-z][A-Za-z'\-]*[.,;:!?]?", t)) for t in tokens) / len(tokens)
    trigrams = [tuple(tokens[i:i + 3]) for i in range(len(tokens) - 2)]
    distinct = len(set(trigrams)) / len(trigrams)
    if wordlike >= 0.8 and distinct >= 0.9:
        return 2
    return 1 if wordlike >= 0.5 and distinct >= 0.6 else 0


def rate(prompt: str) -> str:
    """A judge reply for one AxBench judge prompt."""
    sentence = _section(prompt, "Sentence Fragment")
    if sentence is None:
        return "No [Sentence Fragment Start] section found; this judge only reads AxBench's templates."
    concept, instruction = _section(prompt, "Concept"), _section(prompt, "Instruction")
    if concept is not None:
        return f"Content-word overlap with the concept. Rating: [[{overlap_rating(concept, sentence)}]]"
    if instruction is not None:
        return f"Content-word overlap with the instruction. Rating: [[{overlap_rating(instruction, sentence)}]]"
    return f"Word-likeness and trigram repetition. Rating: [[{fluency_rating(sentence)}]]"


class ChatCompletionServer:
    """A minimal OpenAI-compatible `/v1/chat/completions` on 127.0.0.1; `respond(text)` gives (status, reply)."""

    def __init__(self, respond: Callable[[str], tuple[int, str]], port: int = 0, host: str = "127.0.0.1"):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                if self.path.split("?")[0] != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}", "code": 404}})
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                except ValueError as exc:
                    return self._send(400, {"error": {"message": f"request body is not JSON: {exc}", "code": 400}})
                messages = body.get("messages") if isinstance(body, dict) else None
                if not isinstance(messages, list) or not messages or not all(
                        isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
                    return self._send(400, {"error": {"message": "messages: a non-empty list of "
                                                      "{role, content} with string content is required",
                                                      "param": "messages", "code": 400}})
                text = "\n".join(m["content"] for m in messages)
                status, reply = respond(text)
                if status != 200:
                    return self._send(status, {"error": {"message": reply, "type": "server_error", "code": status}})
                self._send(200, {"id": "judge", "object": "chat.completion", "created": 0,
                                 "model": body.get("model", MODEL_NAME),
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": reply}}]})

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.base_url = f"http://{host}:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def lexical_judge_server(port: int = 0, host: str = "127.0.0.1") -> ChatCompletionServer:
    return ChatCompletionServer(lambda text: (200, rate(text)), port=port, host=host)
