"""Every prompt the models see, rendered through the model's own chat template.

One place for templates (documented in ``docs/templates.md``):

- :func:`encode_response` — BT and BT-prefilled: the chat ``prompt + [assistant: response]``.
- :func:`encode_gpm` — BTPO: the dialog of METHOD.md §2 up to the thought's generation head.
- :func:`encode_judge` — GRAM and GRPO: a judge prompt quoting the conversation (one cutting rule).

All encoders tokenize the *rendered text* with ``add_special_tokens=False`` (the chat template
already writes BOS where the family wants one; Llama-3 tokenizers would otherwise add a second).
Over-long sequences lose prompt tokens from the left; the response is never cut. When the
sequence starts with a document BOS (one that occurs nowhere else), it is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Messages = list[dict[str, str]]

TEMPLATE_VERSION = "btpo-templates/1"
"""Names the wording of every prompt below; stored in ``final/btpo.json``. Bump it when a string changes."""

PLACEHOLDER_PROMPT: list[dict[str, str]] = [{"role": "user", "content": "{prompt}"}]
"""A one-turn conversation with a placeholder: renders each method's template for ``btpo.json``."""


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
    """Keep the last ``budget`` tokens of ``prefix``, keeping a leading BOS if it had one.

    A BOS is kept only when it marks the start of the document (it occurs once, at position 0, as
    Llama 3's ``<|begin_of_text|>``). Tokenizers whose ``bos_token`` is the turn opener (SmolLM2's
    ``<|im_start|>``, which starts every ChatML turn) get a plain left cut: keeping that token
    would glue it onto a fragment of a later turn and make a malformed turn header.
    """
    if len(prefix) <= budget:
        return prefix
    if budget <= 0:
        return []
    if (bos_id is not None and prefix and prefix[0] == bos_id and bos_id not in prefix[1:]
            and budget >= 2):
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


# ----------------------------------------------------------------------------- the dialog-based GPM

EVAL_INSTRUCTION = "Evaluate your previous response for {aspect}. Think it through step by step."
RATING_QUESTION = "Based on your evaluation, is the response {aspect}? Strict format: Yes/No"
_THOUGHT_SLOT = "\u2063THOUGHT\u2063"   # a sentinel that no tokenizer merges with its neighbours


@dataclass
class GPMPrompt:
    """Token ids around the thought of one (prompt, response) in the dialog format (METHOD.md §2).

    ``prefix``: turns 1-3 and the generation head of turn 4 — what the thought is sampled from.
    ``suffix``: what follows the thought: the end of turn 4 (its end-of-turn token first), turn 5
    (the rating question) and the generation head of turn 6. ``p(Yes)`` is read at its last token.
    """

    prefix: list[int]
    suffix: list[int]
    truncated: bool = False


def gpm_messages(prompt: Messages, response: str, aspect: str, thought: str) -> Messages:
    return prompt + [
        {"role": "assistant", "content": response},
        {"role": "user", "content": EVAL_INSTRUCTION.format(aspect=aspect)},
        {"role": "assistant", "content": thought},
        {"role": "user", "content": RATING_QUESTION.format(aspect=aspect)},
    ]


def encode_gpm(tokenizer: Any, prompt: Messages, response: str, aspect: str, max_prefix: int) -> GPMPrompt:
    """Render the dialog with a sentinel thought and split the token ids around it.

    The split is done on text at the sentinel; the suffix starts with a special token (the
    end-of-turn), so tokenizing the two sides separately gives the same ids as the whole. The
    prefix is cut from the left beyond ``max_prefix`` tokens (the response is kept when possible).
    """
    full = render(tokenizer, gpm_messages(prompt, response, aspect, _THOUGHT_SLOT), add_generation_prompt=True)
    head, sep, tail = full.partition(_THOUGHT_SLOT)
    if not sep:
        raise ValueError("the chat template dropped the thought")
    head_ids = encode_text(tokenizer, head)
    truncated = len(head_ids) > max_prefix
    if truncated:
        # keep the response and the evaluation turn: cut only inside the original prompt
        resp_head = render(tokenizer, prompt, add_generation_prompt=True)
        n_prompt = common_prefix_len(encode_text(tokenizer, resp_head), head_ids)
        rest = head_ids[n_prompt:]
        if len(rest) >= max_prefix:
            raise TooLong(f"response + evaluation turn is {len(rest)} tokens, more than {max_prefix}")
        head_ids = left_truncate(head_ids[:n_prompt], max_prefix - len(rest), tokenizer.bos_token_id) + rest
    return GPMPrompt(head_ids, encode_text(tokenizer, tail), truncated)


def answer_token_id(tokenizer: Any, word: str) -> int:
    """The id of ``word`` as the first token of an assistant turn, read off the chat template.

    Families differ (leading space, BOS, header newlines); rendering an assistant turn whose
    content is ``word`` and taking the first token after the generation head avoids guessing.
    """
    msgs = [{"role": "user", "content": "?"}]
    head = encode_text(tokenizer, render(tokenizer, msgs, add_generation_prompt=True))
    full = encode_text(tokenizer, render(tokenizer, msgs + [{"role": "assistant", "content": word}]))
    n = common_prefix_len(head, full)
    if n >= len(full):
        raise ValueError(f"the chat template renders no token for {word!r}")
    return full[n]


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that closes an assistant turn (the thought's stop token), read off the template."""
    msgs = [{"role": "user", "content": "?"}]
    head = encode_text(tokenizer, render(tokenizer, msgs, add_generation_prompt=True))
    full = encode_text(tokenizer, render(tokenizer, msgs + [{"role": "assistant", "content": "ok"}]))
    ok = encode_text(tokenizer, "ok")
    rest = full[common_prefix_len(head, full) + len(ok):]
    if not rest:
        raise ValueError("could not find the end-of-turn token in the chat template")
    return rest[0]


# ----------------------------------------------------------------------------- baselines (METHOD.md §6)

def conversation_text(prompt: Messages) -> str:
    """The prompt turns as plain text, for judge prompts that quote a conversation."""
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    return "\n\n".join(f"{names[m['role']]}: {m['content']}" for m in prompt)


GRAM_PROMPT = (
    "You are given a conversation and two candidate final responses from the assistant.\n\n"
    "[Conversation]\n{conversation}\n\n[Response A]\n{response_a}\n\n[Response B]\n{response_b}\n\n"
    "Which response is more {aspect}? Answer with a single letter: A or B."
)
"""GRAM: pairwise, no thought; the label token (A or B) is read at the assistant's generation head."""

GRPO_PAIR_PROMPT = (
    "You are given a conversation and two candidate final responses from the assistant.\n\n"
    "[Conversation]\n{conversation}\n\n[Response A]\n{response_a}\n\n[Response B]\n{response_b}\n\n"
    "Which response is more {aspect}? First explain your reasoning step by step, then give your final "
    "verdict in exactly this format: [[A]] or [[B]]."
)
"""GRPO (pair), J1 / RM-R1 style: a rationale, then the verdict ``[[A]]`` or ``[[B]]``."""

GRPO_POINT_PROMPT = (
    "You are given a conversation and a candidate final response from the assistant.\n\n"
    "[Conversation]\n{conversation}\n\n[Response]\n{response}\n\n"
    "How {aspect} is the response? First explain your reasoning step by step, then give a score from 1 "
    "to 10 in exactly this format: <score>N</score>."
)
"""GRPO (point), pointwise J1 style: a rationale, then ``<score>N</score>`` with N in 1..10."""


def pairwise_messages(template: str, prompt: Messages, response_a: str, response_b: str,
                      aspect: str) -> Messages:
    return [{"role": "user", "content": template.format(conversation=conversation_text(prompt),
                                                        response_a=response_a, response_b=response_b,
                                                        aspect=aspect)}]


def encode_judge(tokenizer: Any, build: Callable[[Messages], Messages], prompt: Messages,
                 max_length: int) -> tuple[list[int], bool]:
    """Token ids of the judge chat ``build(prompt)`` up to its generation head, at most ``max_length``.

    ``build`` quotes the conversation as :func:`conversation_text` ``(prompt)`` (GRAM, GRPO pair and
    point all do). Over ``max_length``, only the quoted conversation loses tokens, from the left
    (its last turns and the final question are kept; the instructions, the responses and the
    answer format never are cut). Returns ``(ids, truncated)``; raises :class:`TooLong` when the
    judge prompt without any conversation does not fit. A template that rewrites the content so
    that the quote cannot be found keeps the last ``max_length`` tokens.
    """
    text = render(tokenizer, build(prompt), add_generation_prompt=True)
    ids = encode_text(tokenizer, text)
    if len(ids) <= max_length:
        return ids, False
    conv = conversation_text(prompt)
    at = text.find(conv) if conv else -1
    if at < 0:
        return ids[len(ids) - max_length:], True
    head = encode_text(tokenizer, text[:at])
    tail = encode_text(tokenizer, text[at + len(conv):])
    budget = max_length - len(head) - len(tail)
    if budget < 1:
        raise TooLong(f"the judge prompt is {len(head) + len(tail)} tokens without the conversation, "
                      f"more than max_length={max_length}")
    conv_ids = encode_text(tokenizer, conv)
    return head + conv_ids[len(conv_ids) - budget:] + tail, True


def encode_judge_prompts(tokenizer: Any, records: Sequence[Any], builds: Sequence[Callable[[Any, Messages], Messages]],
                         max_length: int) -> tuple[list[tuple[int, list[list[int]]]], dict[str, int]]:
    """Every record's judge prompts, one per ``build(record, prompt)`` (e.g. both orders of a pair).

    Returns ``[(record index, [ids per build])]`` for the records whose prompts all fit (see
    :func:`encode_judge`) and the counts ``truncated`` (prompts cut) and ``too_long`` (records dropped)."""
    out, stats = [], {"truncated": 0, "too_long": 0}
    for k, r in enumerate(records):
        try:
            encoded = [encode_judge(tokenizer, lambda p, b=b, r=r: b(r, p), r.prompt, max_length) for b in builds]
        except TooLong:
            stats["too_long"] += 1
            continue
        stats["truncated"] += sum(int(cut) for _, cut in encoded)
        out.append((k, [ids for ids, _ in encoded]))
    return out, stats


def pointwise_messages(prompt: Messages, response: str, aspect: str) -> Messages:
    return [{"role": "user", "content": GRPO_POINT_PROMPT.format(conversation=conversation_text(prompt),
                                                                 response=response, aspect=aspect)}]


def prefilled_messages(prompt: Messages, response: str, aspect: str, thought: str) -> Messages:
    """BT with a prefilled thought: turns 1-4 of the GPM dialog (the thought written offline)."""
    return prompt + [
        {"role": "assistant", "content": response},
        {"role": "user", "content": EVAL_INSTRUCTION.format(aspect=aspect)},
        {"role": "assistant", "content": thought},
    ]
