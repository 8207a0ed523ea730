"""A scripted OpenAI-compatible judge on 127.0.0.1: the one permitted stand-in (the real judge is a paid API).

The judged text decides the reply: "GOOD" rates 2, "OKAY" rates 1, "MALFORMED" answers without a rating,
"FLAKY" answers 429 to its first two calls, "DOWN" always answers 500, "SLOW" waits before answering.
`server.heal()` makes every later call succeed (for resume tests).
"""

from __future__ import annotations

import threading
import time
from collections import Counter

from flas_vllm.lexical_judge import ChatCompletionServer


class ScriptedJudge:
    def __init__(self):
        self.calls = Counter()
        self.healed = False
        self._lock = threading.Lock()
        self.server = ChatCompletionServer(self.respond)
        self.base_url = self.server.base_url

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
        self.server.__enter__()
        return self

    def __exit__(self, *exc):
        self.server.__exit__(*exc)
