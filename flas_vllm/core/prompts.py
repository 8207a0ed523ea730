"""Prompt formatting as the original evaluates (spec section 6)."""

from __future__ import annotations

ALPACA_TEMPLATE = "{bos}### Instruction:\n{prompt}\n\n### Response:\n"

# The same format as a chat template, for vLLM's chat routes on a checkpoint trained on a base model
# (`prompt_format: alpaca`): earlier turns, if any, are rendered as earlier instruction/response pairs.
ALPACA_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}{% for m in messages %}"
    "{% if m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n### Response:\n"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}\n\n{% endif %}{% endfor %}"
)


# The original renders chat prompts non-thinking: `enable_thinking=False`, passed only to a template
# that reads it (Qwen3's); the flow was trained on that prompt (the project's FLAS families notes, quirk 14).
THINKING_KWARGS = {"enable_thinking": False}


def chat_template_kwargs(template: str | None) -> dict:
    """The template arguments the original passes to this chat template (none, or non-thinking)."""
    return {k: v for k, v in THINKING_KWARGS.items() if template and k in template}


def format_prompt_text(tokenizer, prompt: str, prompt_format: str = "chat") -> str:
    if prompt_format == "chat":
        kwargs = chat_template_kwargs(getattr(tokenizer, "chat_template", None))
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False, **kwargs
        )
    if prompt_format == "alpaca":  # the tokenizer's BOS text first, where it has one (not Qwen3)
        return ALPACA_TEMPLATE.format(bos=tokenizer.bos_token or "", prompt=prompt)
    raise ValueError(f"prompt_format must be 'chat' or 'alpaca', got {prompt_format!r}")


def format_prompt(tokenizer, prompt: str, prompt_format: str = "chat") -> list[int]:
    """Token ids of one user turn; the text already holds the BOS where the family has one."""
    text = format_prompt_text(tokenizer, prompt, prompt_format)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def truncate_prompt(ids: list[int], max_prompt_tokens: int | None) -> list[int]:
    """The original's generator keeps the first 512 tokens of each formatted prompt (right truncation)."""
    return ids if max_prompt_tokens is None else ids[:max_prompt_tokens]
