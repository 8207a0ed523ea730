"""A scripted OpenAI-compatible judge on 127.0.0.1: the one permitted stand-in (the real judge is a paid API).

The judged text decides the reply: "GOOD" rates 2, "OKAY" rates 1, "MALFORMED" answers without a rating,
"FLAKY" answers 429 to its first two calls, "DOWN" always answers 500, "SLOW" waits before answering.
"SPELLING<k>" answers with SPELLINGS[k]: the ways real judges write a rating, most of which the original's
parser accepts (spec section 7), and some with no usable rating at all.
`server.heal()` makes every later call succeed (for resume tests).
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter

from flas_vllm.eval.lexical_judge import ChatCompletionServer


SPELLINGS: list[tuple[str, float | None]] = [
    # (the judge's whole answer, the rating the original's rule reads from it; None: a judge failure)
    ("The concept is clear. Rating: [[2]]", 2.0),
    ("Somewhat present.\nRating: [[1]]", 1.0),
    ("Rating: 2", 2.0),
    ("Explanation here.\n\nRating: **2**", 2.0),
    ("Rating: [2]", 2.0),
    ("Rating: [[1.5]]", 1.5),
    ("Rating: 0.", 0.0),
    ('Rating: "1"', 1.0),
    ("Rating: '2'", 2.0),
    ("Rating: **[[1]]**", 1.0),
    ("Rating: [[2]].", 2.0),
    ("Rating:\n1\nThe fragment is awkward.", 1.0),
    ("First I thought Rating: [[0]] but on reflection\nRating: [[2]]", 2.0),  # the last one counts
    ("Rating:   [[ 1 ]]   ", 1.0),
    ('Rating: "**2**"', 2.0),
    ("Rating: [[2]]\nExplanation: the concept appears twice.", 2.0),
    # no usable rating: the whole answer fails
    ("The concept is present, I would rate it highly.", None),
    ("Rating: [[2]]\nOn second thought. Rating: N/A", None),  # a later unparseable Rating: wins
    ("Rating: [[3]]", None),  # outside 0..2
    ("Rating: 2/2", None),
    ("rating: 2", None),  # the marker is case-sensitive
    ("Rating: **'2'**", None),  # quotes are stripped before stars, so these quotes stay
]


class ScriptedJudge:
    def __init__(self):
        self.calls = Counter()
        self.healed = False
        self._lock = threading.Lock()
        self.server = ChatCompletionServer(self.respond)
        self.base_url = self.server.base_url

    def respond(self, text: str) -> tuple[int, str]:
        spelled = re.search(r"SPELLING(\d+)", text)
        if spelled and not self.healed:
            with self._lock:
                self.calls["SPELLING"] += 1
            return 200, SPELLINGS[int(spelled.group(1))][0]
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
