"""Every prompt the models see, rendered through the model's own chat template.

One place for templates (documented in ``docs/templates.md``):

- :func:`encode_response` — BT and BT-prefilled: the chat ``prompt + [assistant: response]``.

All encoders tokenize the *rendered text* with ``add_special_tokens=False`` (the chat template
already writes BOS where the family wants one; Llama-3 tokenizers would otherwise add a second).
Over-long sequences lose prompt tokens from the left; the response is never cut. When the
sequence starts with BOS, BOS is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Messages = list[dict[str, str]]


def render(tokenizer: Any, messages: Messages, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def left_truncate(prefix: list[int], budget: int, bos_id: int | None) -> list[int]:
    """Keep the last ``budget`` tokens of ``prefix`` (keeping a leading BOS if it had one)."""
    if len(prefix) <= budget:
        return prefix
    if budget <= 0:
        return []
    if bos_id is not None and prefix and prefix[0] == bos_id and budget >= 2:
        return [bos_id] + prefix[len(prefix) - (budget - 1):]
    return prefix[len(prefix) - budget:]


@dataclass
class Encoded:
    input_ids: list[int]
    prompt_len: int
    """Tokens before the part that must not be truncated (the response)."""
    truncated: bool


class TooLong(Exception):
    """The part that must be kept does not fit in ``max_length``."""


def encode_split(tokenizer: Any, head: str, full: str, max_length: int) -> Encoded:
    """Encode ``full`` (which starts with ``head``), cutting only ``head`` from the left if too long."""
    head_ids = encode_text(tokenizer, head)
    full_ids = encode_text(tokenizer, full)
    cut = common_prefix_len(head_ids, full_ids)
    head_ids, tail_ids = full_ids[:cut], full_ids[cut:]
    if len(full_ids) <= max_length:
        return Encoded(full_ids, cut, False)
    budget = max_length - len(tail_ids)
    if budget < 1:
        raise TooLong(f"response is {len(tail_ids)} tokens, more than max_length={max_length}")
    kept = left_truncate(head_ids, budget, tokenizer.bos_token_id)
    return Encoded(kept + tail_ids, len(kept), True)


def encode_response(tokenizer: Any, prompt: Messages, response: str, max_length: int) -> Encoded:
    """The BT input: ``prompt`` then the assistant turn ``response``, rendered by the chat template."""
    head = render(tokenizer, prompt, add_generation_prompt=True)
    full = render(tokenizer, prompt + [{"role": "assistant", "content": response}])
    if not full.startswith(head):
        # Some templates render the last assistant turn differently from a generation prompt;
        # fall back to the common prefix of the two renderings.
        head = head[: common_prefix_len(list(head), list(full))]
    return encode_split(tokenizer, head, full, max_length)
