"""RL frameworks' reward requests → the judge's (prompt, response) items.

OpenRLHF's remote reward model (``--remote_rm_url http://host:port/get_reward``) posts
``{"query": [str, ...], "prompts": [str, ...], "labels": [...]}`` and reads ``rewards`` (newer versions
also ``scores`` and ``extra_logs``) from the answer. Each query is the full rendered text: the prompt
after the policy's chat template, then the response. btpo splits it (:func:`split_query`):

1. **Chat markup**: ChatML (``<|im_start|>role … <|im_end|>``: Qwen, SmolLM2) or Llama 3
   (``<|start_header_id|>role<|end_header_id|> … <|eot_id|>``): the turns are read back, the last
   assistant turn is the response and the turns before it the conversation.
2. Else, when ``prompts[i]`` is given and the query starts with it: the rest is the response and the
   prompt text is one user turn.
3. Else the query cannot be split: its reward is ``on_error`` and ``extra_logs["btpo_error"]`` is 1 for
   it (the request still succeeds; the count is in ``/health``).

Special tokens left at the end of a response (``<|im_end|>``, ``<|eot_id|>``, ``<|endoftext|>``,
``</s>``) are dropped. ``labels`` are ignored (a judge needs no reference answer).
"""

from __future__ import annotations

import re

Messages = list[dict[str, str]]

_CHATML = re.compile(r"<\|im_start\|>(system|user|assistant)\n?(.*?)(?:<\|im_end\|>|(?=<\|im_start\|>)|\Z)", re.S)
_LLAMA3 = re.compile(r"<\|start_header_id\|>(system|user|assistant)<\|end_header_id\|>\n*(.*?)(?:<\|eot_id\|>|"
                     r"(?=<\|start_header_id\|>)|\Z)", re.S)
_TRAILING = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|end|>")


def clean_response(text: str) -> str:
    t = text
    changed = True
    while changed:
        changed = False
        s = t.rstrip()
        for tok in _TRAILING:
            if s.endswith(tok):
                t, changed = s[: -len(tok)], True
    return t.strip()


def _turns(query: str) -> Messages | None:
    for rx in (_CHATML, _LLAMA3):
        found = [{"role": r, "content": c.strip()} for r, c in rx.findall(query)]
        if found:
            return found
    return None


def split_query(query: str, prompt: str | None = None) -> tuple[Messages, str] | str:
    """``query`` (and OpenRLHF's ``prompt`` for it) → (conversation ending with a user turn, response), or the
    reason it cannot be split (see the module docstring)."""
    turns = _turns(query)
    if turns:
        if turns[-1]["role"] != "assistant":
            return "no assistant turn after the last user turn in the chat markup"
        convo = [t for t in turns[:-1] if t["content"] or t["role"] != "system"]
        if not convo or convo[-1]["role"] != "user":
            return "the response does not follow a user turn"
        response = clean_response(turns[-1]["content"])
        return (convo, response) if response else "empty response"
    if prompt and query.startswith(prompt) and len(query) > len(prompt):
        response = clean_response(query[len(prompt):])
        if not prompt.strip():
            return "empty prompt"
        return ([{"role": "user", "content": prompt.strip()}], response) if response else "empty response"
    return "no chat markup and the query does not start with its prompt"
