"""`flas-vllm chat`: the REPL driven through a pseudo-terminal, on a real engine."""

from __future__ import annotations

import sys

import pytest


@pytest.mark.engine
def test_repl_commands_through_a_pty(tiny_model, make_ckpt):
    pexpect = pytest.importorskip("pexpect")
    ckpt = make_ckpt(num_blocks=1)
    child = pexpect.spawn(
        sys.executable,
        ["-m", "flas_vllm.cli", "chat", str(tiny_model), "--flas-checkpoint", str(ckpt), "--eager",
         "--dtype", "float32", "--max-tokens", "8", "--max-model-len", "512",
         "--kv-cache-memory-bytes", str(256 * 1024 * 1024)],
        encoding="utf-8", timeout=300, dimensions=(50, 200),
    )
    try:
        child.expect(r"\[no concept set")
        child.expect("> ")
        child.sendline("Tell me about the sea.")
        child.expect("> ")
        unsteered = child.before.strip()
        assert unsteered and "Tell me about the sea." in unsteered

        child.sendline("/concept talk like a pirate")
        child.expect(r"concept 'talk like a pirate' at flowtime 1")
        child.sendline("/flowtime 2.5")
        child.expect(r"at flowtime 2.5")
        child.sendline("/flowtime nine")
        child.expect(r"flowtime: expected a number")
        child.sendline("/flowtime 99")
        child.expect(r"flowtime: must be within \[0, 8\]")
        child.sendline("/reset")
        child.expect("conversation cleared")
        child.sendline("/compare")
        child.expect(r"compare on")
        child.expect("> ")
        child.sendline("Tell me about the sea.")
        child.expect(r"--- unsteered ---\r?\n(.*?)\r?\n--- steered \(talk like a pirate @ 2.5\) ---\r?\n(.*?)\r?\n> ")
        first, second = child.match.group(1), child.match.group(2)
        assert first.strip() and second.strip()  # by construction: an empty reply is printed as EMPTY_REPLY
        # Not a near-tie property: at T=2.5 the random flow moves the logits far more than any CPU's rounding.
        assert first != second

        child.sendline("/off")
        child.expect(r"\(off\)")
        child.sendline("/on")
        child.expect(r"at flowtime 2.5; compare on")
        child.sendline("/bogus")
        child.expect("unknown command /bogus")
        child.sendline("/quit")
        child.expect("bye")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_session_rejects_bad_commands_without_generating():
    from flas_vllm.serve.repl import ChatSession

    calls = []
    session = ChatSession(generate=lambda convs, steers: calls.append((convs, steers)) or ["x"] * len(convs))
    assert "usage: /concept" in session.handle("/concept")[0]
    assert "must be within" in session.handle("/flowtime -1")[0]
    assert "must be within" in session.handle("/flowtime nan")[0]
    assert session.handle("/quit") == ("bye", False)
    assert calls == []
    session.handle("/concept pirates")
    session.handle("hello")
    assert calls[-1][1] == [{"flas_concept": "pirates", "flas_flowtime": 1.0}]
    session.handle("/off")
    session.handle("again")
    assert calls[-1][1] == [None]
    assert [m["role"] for m in calls[-1][0][0]] == ["user", "assistant", "user"]


def test_an_empty_reply_is_printed_as_such():
    from flas_vllm.serve.repl import EMPTY_REPLY, ChatSession

    session = ChatSession(generate=lambda convs, steers: [" "] * len(convs))
    assert session.handle("say nothing")[0] == EMPTY_REPLY
    session.handle("/concept pirates")
    session.handle("/compare")
    text = session.handle("say nothing")[0]
    assert text.count(EMPTY_REPLY) == 2 and "--- steered (pirates @ 1) ---" in text
