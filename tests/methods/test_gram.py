"""GRAM: the loss of step 1 by hand (both orders, with and without label smoothing), the verdict rule,
truncation of the judge prompt, and train → eval → plain-transformers load end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import run_btpo

SMALL = ["--set", "train.batch_size=4", "--set", "train.micro_batch_size=2", "--set", "optim.lr=1e-3",
         "--set", "optim.warmup_ratio=0", "--set", "data.max_length=256"]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_verdict() -> None:
    from btpo_cli.methods.gram import verdict

    assert verdict(-1.0, -2.0) == "A"
    assert verdict(-2.0, -1.0) == "B"
    assert verdict(-1.5, -1.5) == "tie"
    assert verdict(float("-inf"), float("-inf")) == "tie"


def test_gram_loss_is_smoothed_cross_entropy() -> None:
    from btpo_cli.losses import gram_loss

    la = torch.log(torch.tensor([0.5, 0.2]))
    lb = torch.log(torch.tensor([0.1, 0.6]))
    target_is_a = torch.tensor([True, False])
    assert gram_loss(la, lb, target_is_a).tolist() == pytest.approx([-math.log(0.5), -math.log(0.6)])
    smoothed = gram_loss(la, lb, target_is_a, 0.1).tolist()
    assert smoothed == pytest.approx([-(0.9 * math.log(0.5) + 0.1 * math.log(0.1)),
                                      -(0.9 * math.log(0.6) + 0.1 * math.log(0.2))])


def test_encode_judge_cuts_only_the_conversation() -> None:
    from btpo_cli.judging.templates import GRAM_PROMPT, TooLong, pairwise_messages
    from btpo_cli.judging.templates import encode_judge as encode
    from btpo_cli.models.loading import load_tokenizer

    def encode_judge(tok, prompt, a, b, aspect, max_length):  # noqa: ANN001, ANN202 - the GRAM prompt of a, b
        return encode(tok, lambda p: pairwise_messages(GRAM_PROMPT, p, a, b, aspect), prompt, max_length)

    tok = load_tokenizer("tiny-qwen2", padding_side="left")
    prompt = [{"role": "user", "content": " ".join(f"w{i}" for i in range(300)) + " final question"}]
    full, cut = encode_judge(tok, prompt, "first answer", "second answer", "helpful", 10_000)
    assert not cut
    ids, cut = encode_judge(tok, prompt, "first answer", "second answer", "helpful", 200)
    assert cut and len(ids) == 200
    text = tok.decode(ids)
    for kept in ("You are given a conversation", "final question", "[Response A]\nfirst answer",
                 "[Response B]\nsecond answer", "Answer with a single letter"):
        assert kept in text
    assert "w0 " not in text and ids[-5:] == full[-5:]
    with pytest.raises(TooLong):
        encode_judge(tok, prompt, "long " * 200, "x", "helpful", 100)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_first_step_loss_by_hand(tmp_path: Path, synthetic_data: Path, eps: float) -> None:
    """Step 1's loss = mean over both orders of the step-1 pairs of −(1−ε)log p(correct) − ε log p(other)."""
    from btpo_cli.config import build_config
    from btpo_cli.data.pairs import read_pairs
    from btpo_cli.methods.gram import Labels, encode_pairs
    from btpo_cli.models.loading import load_causal_lm, load_tokenizer
    from btpo_cli.training.steps import BatchPlan

    run_dir = tmp_path / "r"
    run_btpo("train", "--method", "gram", "--data", str(synthetic_data), "--out", str(run_dir), "--max-steps", "1",
             "--set", f"gram.label_smoothing={eps}", *SMALL)
    cfg = build_config(None, [s for s in SMALL if s != "--set"], {"data.path": str(synthetic_data)})
    tok = load_tokenizer("tiny-qwen2", padding_side="left")
    lab = Labels.from_tokenizer(tok)
    recs, _ = read_pairs(synthetic_data)
    pairs, _ = encode_pairs(tok, recs, cfg.data.max_length)
    model = load_causal_lm(cfg.model).eval()
    by_hand, correct = [], 0
    with torch.no_grad():
        for i in BatchPlan.from_config(len(pairs), cfg, 1).global_batch(1):
            for seq, right, wrong in ((pairs[i].ab, lab.a_id, lab.b_id), (pairs[i].ba, lab.b_id, lab.a_id)):
                logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0, -1].double(), -1)
                by_hand.append(-(1 - eps) * logp[right].item() - eps * logp[wrong].item())
                correct += int(logp[right] > logp[wrong])
    row = next(r for r in _rows(run_dir) if r.get("step") == 1)
    assert len(by_hand) == 2 * cfg.train.batch_size
    assert row["train/loss"] == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-5)
    assert row["train/accuracy"] == pytest.approx(correct / len(by_hand))


@pytest.mark.slow
def test_train_eval_and_plain_load(tmp_path: Path, synthetic_data: Path) -> None:
    run_dir = tmp_path / "gram"
    run_btpo("train", "--method", "gram", "--data", str(synthetic_data), "--out", str(run_dir), "--max-steps", "3",
             "--set", "gram.label_smoothing=0.1", *SMALL)
    rows = [r for r in _rows(run_dir) if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("train/accuracy", "train/grad_norm", "train/lr", "gram/label_mass", "perf/tokens_per_s"):
        assert key in rows[0], key
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    meta = json.loads((run_dir / "final" / "btpo.json").read_text())
    assert meta["method"] == "gram" and meta["model_class"] == "AutoModelForCausalLM"

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run_dir / "final")
    run_btpo("eval", "--checkpoint", str(run_dir))
    summary = json.loads((run_dir / "eval" / "synthetic.json").read_text())
    assert summary["method"] == "gram" and summary["protocol"] == "pairwise" and summary["n"] == 24
    preds = [json.loads(x) for x in (run_dir / "eval" / "synthetic.predictions.jsonl").read_text().splitlines()]
    from btpo_cli.judging.protocol import order_credit
    from btpo_cli.methods.gram import verdict

    for p in preds:   # each order's verdict follows p(A) vs p(B); the pair's credit is their mean
        v1, v2 = verdict(*map(math.log, p["p_ab"])), verdict(*map(math.log, p["p_ba"]))
        assert (p["chosen_as_a"], p["chosen_as_b"]) == (v1, v2)
        assert p["credit"] == (order_credit(v1, "A")[0] + order_credit(v2, "B")[0]) / 2
