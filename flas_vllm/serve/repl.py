"""`flas-vllm chat`: an interactive steering REPL over FlasLLM.

Commands: /concept TEXT, /flowtime T, /off, /on, /compare (toggle steered and
unsteered replies side by side), /reset, /help, /quit. Anything else is a user
message; the conversation keeps the replies of the steered (or, when
steering is off, unsteered) assistant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from flas_vllm.core.config import ENGINE_OPTION_DEFAULTS
from flas_vllm.core.errors import SteeringParamError
from flas_vllm.core.steering import check_concept, check_flowtime, steering

HELP = (
    "commands: /concept TEXT  /flowtime T  /on  /off  /compare  /reset  /help  /quit\n"
    "anything else is sent as your message"
)

EMPTY_REPLY = "(empty reply: the model ended its turn at once)"


@dataclass
class ChatSession:
    generate: Callable[[list[list[dict]], list[Optional[dict]]], list[str]]
    max_flowtime: float = ENGINE_OPTION_DEFAULTS["max_flowtime"]
    max_concept_bytes: int = ENGINE_OPTION_DEFAULTS["max_concept_bytes"]
    concept: Optional[str] = None
    flowtime: float = 1.0
    steering_on: bool = True
    compare: bool = False
    history: list[dict] = field(default_factory=list)

    def status(self) -> str:
        if self.concept is None:
            steer = "no concept set (/concept TEXT)"
        else:
            steer = f"concept {self.concept!r} at flowtime {self.flowtime:g}" + ("" if self.steering_on else " (off)")
        return f"[{steer}; compare {'on' if self.compare else 'off'}]"

    def _steering(self) -> Optional[dict]:
        if self.concept is None or not self.steering_on:
            return None
        return steering(self.concept, self.flowtime)

    def handle(self, line: str) -> tuple[str, bool]:
        """Process one input line -> (text to print, keep going)."""
        line = line.strip()
        if not line:
            return "", True
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            arg = arg.strip()
            if cmd == "/quit":
                return "bye", False
            if cmd == "/help":
                return HELP, True
            if cmd == "/concept":
                if not arg:
                    return "usage: /concept TEXT (a non-empty concept)", True
                try:
                    self.concept, self.steering_on = check_concept(arg, self.max_concept_bytes), True
                except SteeringParamError as exc:
                    return str(exc), True
                return self.status(), True
            if cmd == "/flowtime":
                try:
                    value = float(arg)
                except ValueError:
                    return f"flowtime: expected a number, got {arg!r}", True
                limit = self.max_flowtime  # shown as the REPL shows numbers: 8, not 8.0
                try:
                    self.flowtime = check_flowtime(value, int(limit) if float(limit).is_integer() else limit)
                except SteeringParamError as exc:
                    return str(exc), True
                return self.status(), True
            if cmd in ("/on", "/off"):
                self.steering_on = cmd == "/on"
                return self.status(), True
            if cmd == "/compare":
                self.compare = not self.compare
                return self.status(), True
            if cmd == "/reset":
                self.history.clear()
                return "conversation cleared " + self.status(), True
            return f"unknown command {cmd}; {HELP}", True
        messages = self.history + [{"role": "user", "content": line}]
        steer = self._steering()
        if self.compare and steer is not None:
            steered, unsteered = self.generate([messages, messages], [steer, None])
            reply = steered
            text = (f"--- unsteered ---\n{_shown(unsteered)}\n"
                    f"--- steered ({self.concept} @ {self.flowtime:g}) ---\n{_shown(steered)}")
        else:
            reply = self.generate([messages], [steer])[0]
            text = _shown(reply)
        self.history = messages + [{"role": "assistant", "content": reply}]
        return text, True


def _shown(reply: str) -> str:
    """A reply as printed: an empty one (the model ended its turn at once) says so instead of a blank line."""
    return reply if reply.strip() else EMPTY_REPLY


def run_repl(llm, *, max_tokens: int = 128, temperature: float = 0.0, max_flowtime: float | None = None,
             input_fn=input, print_fn=print) -> None:
    """`max_flowtime`: the engine's (FlasLLM.options) unless given."""
    options = getattr(llm, "options", None)
    if max_flowtime is None:
        max_flowtime = options.max_flowtime if options is not None else ENGINE_OPTION_DEFAULTS["max_flowtime"]
    max_concept_bytes = options.max_concept_bytes if options is not None else ENGINE_OPTION_DEFAULTS["max_concept_bytes"]
    from vllm import SamplingParams  # lazy: vllm is heavy

    def generate(conversations, steerings):
        params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, extra_args=s) for s in steerings]
        outs = llm.chat(conversations, params, use_tqdm=False)
        return [o.outputs[0].text for o in outs]

    session = ChatSession(generate=generate, max_flowtime=max_flowtime, max_concept_bytes=max_concept_bytes)
    print_fn("flas-vllm chat. " + HELP)
    print_fn(session.status())
    while True:
        try:
            line = input_fn("> ")
        except EOFError:
            print_fn("bye")
            return
        try:
            text, keep_going = session.handle(line)
        except ValueError as exc:  # a steering field the engine refused: report, keep the REPL
            text, keep_going = f"error: {exc}", True
        if text:
            print_fn(text)
        if not keep_going:
            return
