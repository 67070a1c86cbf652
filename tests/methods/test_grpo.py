"""GRPO baselines (pair and point): rewards, advantages, judge prompts, CLI end to end, exact resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from btpo_cli.judging.parsers import ScoreParse, VerdictParse, parse_score, parse_verdict
from btpo_cli.judging.templates import encode_judge
from btpo_cli.losses import group_advantages
from btpo_cli.methods.grpo_common import Query
from btpo_cli.methods.grpo_pair import PairTask, chosen_first, verdict_reward
from btpo_cli.methods.grpo_point import PointTask, paired_rewards
from tests.conftest import REPO, run_btpo

SMALL = ["--set", "rollout.batch_size=4", "--set", "train.batch_size=2", "--set", "train.micro_batch_size=1",
         "--set", "rollout.n=2", "--set", "rollout.max_new_tokens=8", "--set", "data.max_length=256",
         "--set", "optim.lr=1e-3", "--set", "optim.warmup_ratio=0"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}   # tiny models: threads only add contention on a busy 2-core runner


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- rewards and advantages


def test_pair_reward_follows_the_order() -> None:
    a, b = VerdictParse("A", None), VerdictParse("B", None)
    bad = VerdictParse(None, "no_tag")
    # chosen shown as A: the correct verdict is A; shown as B (order swapped): B
    assert verdict_reward(a, "A") == 1.0 and verdict_reward(b, "A") == 0.0
    assert verdict_reward(b, "B") == 1.0 and verdict_reward(a, "B") == 0.0
    assert verdict_reward(bad, "A") == 0.0 and verdict_reward(bad, "B") == 0.0
    queries = [Query([1], "A"), Query([2], "B")]
    parses = [[parse_verdict("x [[A]]"), parse_verdict("[[B]]"), parse_verdict("[[C]]")],
              [parse_verdict("[[A]]"), parse_verdict("y [[B]]"), parse_verdict("[[B")]]
    r = PairTask().rewards(queries, parses)
    assert r.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


def test_pair_order_is_seeded_balanced_and_recorded() -> None:
    from array import array

    from btpo_cli.methods.grpo_pair import PairUnit

    flips = [chosen_first(0, 1, i) for i in range(2000)]
    assert flips == [chosen_first(0, 1, i) for i in range(2000)]          # deterministic
    assert 0.45 < sum(flips) / len(flips) < 0.55                           # a fair coin
    assert flips != [chosen_first(0, 2, i) for i in range(2000)]          # a new draw per rollout
    units = [PairUnit(i, array("i", [1, i]), array("i", [2, i])) for i in range(50)]
    for q, u in zip(PairTask().queries(units, 3, 0), units, strict=True):
        first = chosen_first(0, 3, u.index)
        assert q.label == ("A" if first else "B")
        assert q.ids == ([1, u.index] if first else [2, u.index])


def test_point_reward_compares_paired_samples() -> None:
    s = [ScoreParse(v, None) for v in (8.0, 3.0, 5.0, 9.0)]
    none = ScoreParse(None, "no_tag")
    w = [s[0], s[1], s[2], none, s[3]]       # 8, 3, 5, ✗, 9
    lo = [s[1], s[0], s[2], s[1], none]      # 3, 8, 5, 3, ✗
    rw, rl = paired_rewards(w, lo)
    assert rw == [1.0, 0.0, 0.0, 0.0, 0.0]   # beats; loses; tie; w unparsable; l unparsable
    assert rl == [1.0, 0.0, 0.0, 0.0, 0.0]   # the rejected sample is rewarded for being below
    queries = [Query([1], "chosen"), Query([2], "rejected")]
    r = PointTask().rewards(queries, [[parse_score("<score>9</score>"), parse_score("<score>2</score>")],
                                      [parse_score("<score>4</score>"), parse_score("<score>3</score>")]])
    assert r.tolist() == [[1.0, 0.0], [1.0, 0.0]]


def test_group_advantages() -> None:
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0]])
    a = group_advantages(r)
    std = (0.75 * 0.25) ** 0.5                                   # population std of one 1 among four
    assert torch.allclose(a[0], (r[0] - 0.25) / (std + 1e-6))
    assert torch.equal(a[1], torch.zeros(4))                     # a flat group gives no signal
    assert torch.allclose(a[2], torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-5)
    assert torch.allclose(a.sum(-1), torch.zeros(3), atol=1e-5)
    assert torch.equal(group_advantages(torch.tensor([[1.0], [0.0]])), torch.zeros(2, 1))   # G = 1


def test_judge_prompt_keeps_responses_and_cuts_the_conversation() -> None:
    from btpo_cli.judging.templates import GRPO_PAIR_PROMPT, TooLong, encode_text, pairwise_messages
    from btpo_cli.models.loading import load_tokenizer

    tok = load_tokenizer("tiny-qwen2", padding_side="left")
    prompt = [{"role": "user", "content": "first turn " * 60}, {"role": "assistant", "content": "ok " * 40},
              {"role": "user", "content": "the last question " * 20}]

    def build(p: list[dict[str, str]]) -> list[dict[str, str]]:
        return pairwise_messages(GRPO_PAIR_PROMPT, p, "RESPONSE-ONE", "RESPONSE-TWO", "correct")

    full, cut = encode_judge(tok, build, prompt, 10_000)
    assert not cut
    for budget in (len(full) - 5, len(full) - 150, len(full) - 250):
        ids, cut = encode_judge(tok, build, prompt, budget)
        text = tok.decode(ids)
        assert cut and len(ids) <= budget
        assert "RESPONSE-ONE" in text and "RESPONSE-TWO" in text and "[[A]] or [[B]]" in text
        assert text.endswith("<|im_start|>assistant\n")
    head = len(encode_text(tok, tok.apply_chat_template(build([]), tokenize=False, add_generation_prompt=True)))
    with pytest.raises(TooLong):
        encode_judge(tok, build, prompt, head - 1)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo-pair", "grpo-point"])
def test_train_and_eval(method: str, tmp_path: Path, synthetic_data: Path) -> None:
    run_dir = tmp_path / method
    run_btpo("train", "--method", method, "--model", "tiny-qwen2", "--data", str(synthetic_data), "--out",
             str(run_dir), "--max-steps", "3", *SMALL, env=ONE_THREAD)
    rows = [r for r in _rows(run_dir) if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["train/rollout"] for r in rows] == [1, 1, 2]            # 4 pairs per rollout, 2 per step
    for key in ("grpo/reward_mean", "grpo/format_error_rate", "grpo/completion_len", "grpo/clip_fraction",
                "grpo/format_truncated", "grpo/flat_group_fraction", "perf/gen_tokens_per_s", "train/grad_norm"):
        assert key in rows[0], key
    # a random tiny model never writes the tag within 8 tokens: every completion is a format error
    assert rows[0]["grpo/format_error_rate"] == 1.0 and rows[0]["grpo/reward_mean"] == 0.0
    assert rows[0]["grpo/completion_len"] <= 8

    run_btpo("eval", "--checkpoint", str(run_dir), "--max-new-tokens", "8", env=ONE_THREAD)
    summary = json.loads((run_dir / "eval" / "synthetic.json").read_text())
    assert summary["method"] == method and summary["n"] == 24
    assert summary["protocol"] == ("pairwise" if method == "grpo-pair" else "pointwise")
    assert summary["raw_accuracy"] == 0.0 and summary["accuracy"] == 0.5 and summary["clipped"]
    assert summary["format_error_rate"] == 1.0 and summary["tie_rate"] == 0.0
    rationales = [json.loads(x) for x in (run_dir / "eval" / "synthetic.rationales.jsonl").read_text().splitlines()]
    preds = [json.loads(x) for x in (run_dir / "eval" / "synthetic.predictions.jsonl").read_text().splitlines()]
    assert len(rationales) == 24 and len(preds) == 24
    if method == "grpo-pair":
        assert {"rationale_chosen_as_a", "verdict_chosen_as_a", "rationale_chosen_as_b"} <= set(rationales[0])
        assert preds[0]["error_chosen_as_a"] == "truncated" and preds[0]["parse"]["truncated"] == 2
    else:
        assert {"rationale_chosen", "score_chosen", "rationale_rejected"} <= set(rationales[0])
        assert preds[0]["error_chosen"] == "truncated" and preds[0]["parse"]["truncated"] == 2


# The tiny model writes no tags, so every reward would be 0 and an update would change nothing. For the
# resume test the parser is replaced (in the training subprocess only) by a deterministic function of the
# sampled text, so rewards, advantages and updates are non-trivial and depend on the RNG being restored.
PATCHED_CLI = """
import sys
from btpo_cli.methods import grpo_point
from btpo_cli.judging.parsers import ScoreParse
grpo_point.PointTask.parse = lambda self, text, finished: ScoreParse(float(sum(map(ord, text)) % 10 + 1))
from btpo_cli.cli import main
main(sys.argv[1:])
"""


def _run_patched(script: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ, **ONE_THREAD, **(env or {}))
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=e, cwd=REPO,
                          timeout=600)


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(tmp_path: Path, synthetic_data: Path) -> None:
    script = tmp_path / "patched_cli.py"
    script.write_text(PATCHED_CLI)
    args = ["train", "--method", "grpo-point", "--data", str(synthetic_data), "--max-steps", "6",
            "--set", "train.save_every=2", "--set", "optim.scheduler=constant", *SMALL, "--set", "rollout.n=3"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    p = _run_patched(script, *args, "--out", str(full))
    assert p.returncode == 0, p.stderr
    p = _run_patched(script, *args, "--out", str(killed), env={"BTPO_FAULT_AT_STEP": "3"})
    assert p.returncode == 17, p.stderr
    p = _run_patched(script, "train", "--out", str(killed), "--resume")
    assert p.returncode == 0, p.stderr

    def steps(d: Path) -> list[dict]:
        return [r for r in _rows(d) if "train/loss" in r]

    ref = steps(full)
    assert [(r["train/loss"], r["train/grad_norm"]) for r in steps(killed)] == \
        [(r["train/loss"], r["train/grad_norm"]) for r in ref]
    assert [r.get("grpo/reward_mean") for r in steps(killed)] == [r.get("grpo/reward_mean") for r in ref]
    assert any(r["train/grad_norm"] > 0 for r in ref)                   # the updates were not trivial
    # first step on a fresh rollout: ratio 1, and the advantages of each group sum to 0 → loss 0
    for r in ref[::2]:
        assert abs(r["train/loss"]) < 1e-5
