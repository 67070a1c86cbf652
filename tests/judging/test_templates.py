from __future__ import annotations

import pytest

from btpo_cli.judging.templates import TooLong, encode_response, encode_text, render
from btpo_cli.models.loading import load_tokenizer


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama"])
def test_response_never_truncated_prompt_cut_from_left(name: str) -> None:
    tok = load_tokenizer(name)
    prompt = [{"role": "user", "content": "word " * 300 + "What is 2 + 3?"}]
    response = "2 + 3 = 5."
    full = encode_response(tok, prompt, response, max_length=10_000)
    assert not full.truncated
    short = encode_response(tok, prompt, response, max_length=60)
    assert short.truncated and len(short.input_ids) == 60
    # the response part (after the prompt) is identical
    assert short.input_ids[short.prompt_len:] == full.input_ids[full.prompt_len:]
    # the kept prompt is the *end* of the prompt (what is cut is from the left)
    kept = short.input_ids[:short.prompt_len]
    if tok.bos_token_id is not None and full.input_ids[0] == tok.bos_token_id:
        assert kept[0] == tok.bos_token_id
        kept = kept[1:]
    assert full.input_ids[:full.prompt_len][-len(kept):] == kept
    with pytest.raises(TooLong):
        encode_response(tok, prompt, "long " * 100, max_length=30)


def test_llama_bos_not_doubled() -> None:
    tok = load_tokenizer("tiny-llama")
    msgs = [{"role": "user", "content": "hi"}]
    ids = encode_text(tok, render(tok, msgs, add_generation_prompt=True))
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
