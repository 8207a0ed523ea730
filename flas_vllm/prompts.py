"""Prompt formatting as the original evaluates (spec section 6)."""

from __future__ import annotations

ALPACA_TEMPLATE = "<bos>### Instruction:\n{prompt}\n\n### Response:\n"

# The same format as a chat template, for vLLM's chat routes on a checkpoint trained on a base model
# (`prompt_format: alpaca`): earlier turns, if any, are rendered as earlier instruction/response pairs.
ALPACA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n### Response:\n"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}\n\n{% endif %}{% endfor %}"
)


def format_prompt_text(tokenizer, prompt: str, prompt_format: str = "chat") -> str:
    if prompt_format == "chat":
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    if prompt_format == "alpaca":
        return ALPACA_TEMPLATE.format(prompt=prompt)
    raise ValueError(f"prompt_format must be 'chat' or 'alpaca', got {prompt_format!r}")


def format_prompt(tokenizer, prompt: str, prompt_format: str = "chat") -> list[int]:
    """Token ids of one user turn; the template already holds `<bos>`, so none is added again."""
    text = format_prompt_text(tokenizer, prompt, prompt_format)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def truncate_prompt(ids: list[int], max_prompt_tokens: int | None) -> list[int]:
    """The original's generator keeps the first 512 tokens of each formatted prompt (right truncation)."""
    return ids if max_prompt_tokens is None else ids[:max_prompt_tokens]
