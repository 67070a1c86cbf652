"""The dialog-based GPM: template ids per family, and one-pass scoring equals the plain forward."""

from __future__ import annotations

import pytest
import torch

from btpo_cli.config import ModelConfig
from btpo_cli.engines import SamplingParams
from btpo_cli.engines.hf import HFEngine
from btpo_cli.judging.logprobs import score_thoughts, thought_sequence
from btpo_cli.judging.templates import (
    EVAL_INSTRUCTION,
    RATING_QUESTION,
    answer_token_id,
    encode_gpm,
    encode_text,
    end_of_turn_id,
    gpm_messages,
    render,
)
from btpo_cli.models.loading import load_causal_lm, load_tokenizer

FAMILIES = {"tiny-qwen2": ("<|im_end|>", "<|im_start|>assistant\n"),
            "tiny-llama": ("<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n")}
PROMPT = [{"role": "user", "content": "What is 12 + 30?"}]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_token_ids_from_template(name: str) -> None:
    tok = load_tokenizer(name)
    eot, head = FAMILIES[name]
    assert tok.convert_ids_to_tokens(answer_token_id(tok, "Yes")) == "Yes"
    assert tok.convert_ids_to_tokens(answer_token_id(tok, "No")) == "No"
    assert tok.convert_ids_to_tokens(end_of_turn_id(tok)) == eot
    g = encode_gpm(tok, PROMPT, "12 + 30 = 42.", "correct", 4096)
    assert tok.decode(g.prefix).endswith(EVAL_INSTRUCTION.format(aspect="correct") + eot + "\n" * (name == "tiny-qwen2")
                                         + head)
    assert g.suffix[0] == end_of_turn_id(tok)
    assert tok.decode(g.suffix).endswith(RATING_QUESTION.format(aspect="correct") + eot + "\n" * (name == "tiny-qwen2")
                                         + head)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_prefix_thought_suffix_equals_rendered_dialog(name: str) -> None:
    """prefix + thought ids + suffix is exactly the chat template's rendering of the whole dialog."""
    tok = load_tokenizer(name)
    thought = "The sum of 12 and 30 is 42, so the response is right."
    g = encode_gpm(tok, PROMPT, "12 + 30 = 42.", "correct", 4096)
    z = encode_text(tok, thought) + [end_of_turn_id(tok)]
    seq = thought_sequence(g, z, end_of_turn_id(tok))
    full = encode_text(tok, render(tok, gpm_messages(PROMPT, "12 + 30 = 42.", "correct", thought),
                                   add_generation_prompt=True))
    assert seq.ids == full
    assert seq.n_thought == len(z) and seq.n_tail == len(g.suffix) - 1


def test_long_prompt_cut_keeps_response_and_instruction() -> None:
    tok = load_tokenizer("tiny-qwen2")
    long = [{"role": "user", "content": "blah " * 400 + "What is 1 + 1?"}]
    g = encode_gpm(tok, long, "1 + 1 = 2.", "correct", 120)
    assert g.truncated and len(g.prefix) == 120
    assert tok.decode(g.prefix).endswith(EVAL_INSTRUCTION.format(aspect="correct") + "<|im_end|>\n<|im_start|>assistant\n")
    assert "1 + 1 = 2." in tok.decode(g.prefix)


@pytest.mark.parametrize("normalize", [False, True])
def test_one_pass_scores_equal_plain_forward(normalize: bool) -> None:
    tok = load_tokenizer("tiny-llama")
    model = load_causal_lm(ModelConfig(name="tiny-llama")).eval()
    yes, no, eot = answer_token_id(tok, "Yes"), answer_token_id(tok, "No"), end_of_turn_id(tok)
    prompts = [encode_gpm(tok, [{"role": "user", "content": "q" * (3 * i + 1)}], f"answer {i}", "correct", 512)
               for i in range(3)]
    samples = HFEngine(model, tok.pad_token_id).generate(
        [p.prefix for p in prompts], 2, SamplingParams(1.0, 1.0, 6, [eot], seed=0))
    seqs = [thought_sequence(p, s, eot) for p, grp in zip(prompts, samples, strict=True) for s in grp]
    with torch.no_grad():
        sc = score_thoughts(model, seqs, yes, no, tok.pad_token_id, yes_no_normalize=normalize)
        for i, s in enumerate(seqs):
            lp = torch.log_softmax(model(input_ids=torch.tensor([s.ids])).logits[0].float(), -1)
            start = len(s.ids) - s.n_tail - s.n_thought
            ref = torch.stack([lp[start + j - 1, s.ids[start + j]] for j in range(s.n_thought)])
            assert torch.allclose(sc.logp[i, :s.n_thought], ref, atol=1e-4)
            assert sc.mask[i].sum() == s.n_thought
            want = lp[-1, yes] - torch.logaddexp(lp[-1, yes], lp[-1, no]) if normalize else lp[-1, yes]
            assert torch.allclose(sc.logp_yes[i], want, atol=1e-4)
