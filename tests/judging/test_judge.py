"""The trained judge in use: self-describing checkpoints, ``btpo score`` = ``btpo eval``, the Python API.

Every method is trained for a few steps on tiny-qwen2; its ``final/`` folder is then copied away
from the run folder, so ``btpo score`` can only use what ``btpo.json`` says.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ONE_THREAD, REPO, run_btpo

GENERATIVE = {"bt-prefilled", "grpo-pair", "grpo-point", "btpo"}
N_PAIRS = 8


@pytest.fixture
def trained(trained_judge):
    return trained_judge


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


# ----------------------------------------------------------------------------- score = eval, for every method


@pytest.mark.slow
@pytest.mark.parametrize("method", ["bt", "bt-prefilled", "gram", "grpo-pair", "grpo-point", "btpo"])
def test_score_on_test_pairs_takes_the_decisions_of_eval(method: str, trained, synthetic_data: Path,
                                                         tmp_path: Path) -> None:
    run = trained(method)
    budget = ["--max-new-tokens", "8"] if method in GENERATIVE else []
    run_btpo("eval", "--checkpoint", str(run), "--limit", str(N_PAIRS), "--batch-size", "4", *budget, env=ONE_THREAD)
    summary = json.loads((run / "eval" / "synthetic.json").read_text())
    preds = {p["id"]: p for p in _jsonl(run / "eval" / "synthetic.predictions.jsonl")}
    assert len(preds) == N_PAIRS

    # the checkpoint alone: final/ copied away from config.yaml
    judge_dir = tmp_path / "judge"
    shutil.copytree(run / "final", judge_dir)
    meta = json.loads((judge_dir / "btpo.json").read_text())
    assert meta["format"] == "btpo-checkpoint/1" and meta["method"] == method
    assert meta["base_model"] == "tiny-qwen2" and meta["aspect"] == "correct" and meta["aspects"] == {"correct": 96}
    assert meta["protocol"] == ("pairwise" if method in ("gram", "grpo-pair") else "pointwise")
    assert meta["template"]["version"] == "btpo-templates/1" and "{response" in meta["template"]["rendered"]
    assert meta["settings"]["method"] == method and meta["settings"]["data"]["max_length"] in (128, 256, 1024)
    assert meta["eval"]["synthetic/test"]["n"] == N_PAIRS
    assert meta["eval"]["synthetic/test"]["raw_accuracy"] == summary["raw_accuracy"]
    if method == "btpo":
        assert {"yes", "no", "end_of_turn"} <= set(meta["token_ids"]) and meta["training"]["rollout"]["n"] == 2
        assert meta["settings"]["btpo"]["yes_no_normalize"] is False
    card = (judge_dir / "README.md").read_text()
    assert f"a `{method}` judge" in card and "| synthetic/test | 8 |" in card

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join((synthetic_data / "test.jsonl").read_text().splitlines(keepends=True)[:N_PAIRS]))
    p = run_btpo("score", "--judge", str(judge_dir), str(pairs), "--batch-size", "4", "--thoughts", *budget,
                 env=ONE_THREAD)
    rows = [json.loads(x) for x in p.stdout.splitlines()]
    assert [r["line"] for r in rows] == list(range(1, N_PAIRS + 1))
    thought_keys = {"thought_chosen", "thought_rejected", "rationale_chosen_as_a", "rationale_chosen_as_b"}
    for r in rows:
        got = {k: v for k, v in r.items() if k != "line" and k not in thought_keys}
        assert got == preds[r["id"]], r["id"]              # same credit, scores, verdicts, parse errors
    m = re.search(r"pairs: n=(\d+) accuracy ([\d.]+)% \(raw ([\d.]+)%\)", p.stderr)
    assert m and int(m.group(1)) == N_PAIRS
    assert float(m.group(3)) == pytest.approx(100 * summary["raw_accuracy"], abs=0.05)

    # the thoughts / rationales behind the decisions are the ones eval wrote
    by_id = {r["id"]: r for r in rows}
    if method == "btpo":
        for t in _jsonl(run / "eval" / "synthetic.thoughts.jsonl"):
            assert (by_id[t["id"]]["thought_chosen"], by_id[t["id"]]["thought_rejected"]) == \
                   (t["thought_chosen"], t["thought_rejected"])
    elif method == "bt-prefilled":
        for t in _jsonl(run / "eval" / "synthetic.prefilled_thoughts.jsonl"):
            assert (by_id[t["id"]]["thought_chosen"], by_id[t["id"]]["thought_rejected"]) == \
                   (t["thought_chosen"], t["thought_rejected"])
    elif method in ("grpo-pair", "grpo-point"):
        for t in _jsonl(run / "eval" / "synthetic.rationales.jsonl"):
            if method == "grpo-point":
                assert (by_id[t["id"]]["thought_chosen"], by_id[t["id"]]["thought_rejected"]) == \
                       (t["rationale_chosen"], t["rationale_rejected"])
            else:
                assert (by_id[t["id"]]["rationale_chosen_as_a"], by_id[t["id"]]["rationale_chosen_as_b"]) == \
                       (t["rationale_chosen_as_a"], t["rationale_chosen_as_b"])


# ----------------------------------------------------------------------------- the Python API


@pytest.mark.slow
def test_python_api_pointwise_reward_model(trained) -> None:
    import math

    from btpo_cli import load_judge

    run = trained("bt")
    with load_judge(run, device="cpu") as judge:
        prompt = [{"role": "system", "content": "You check arithmetic."}, {"role": "user", "content": "What is 2 + 3?"}]
        cands = ["2 + 3 = 5.", "2 + 3 = 6.", "2 + 3 = 4."]
        scores = judge.score([prompt] * 3, cands)
        assert all(isinstance(s.score, float) and s.error is None for s in scores)
        c = judge.compare(prompt, cands[0], cands[1])
        assert c.prob_a == pytest.approx(1 / (1 + math.exp(-(scores[0].score - scores[1].score))), abs=1e-5)
        assert c.verdict == ("a" if scores[0].score > scores[1].score else "b")
        best = judge.best_of_n(prompt, cands)
        assert best.best == max(range(3), key=lambda i: scores[i].score)
        assert best.scores == pytest.approx([s.score for s in scores], abs=1e-5)
        # a plain string prompt is one user turn
        (s,) = judge.score(["What is 2 + 3?"], ["5"])
        (t,) = judge.score([[{"role": "user", "content": "What is 2 + 3?"}]], ["5"])
        assert s.score == pytest.approx(t.score, abs=1e-6)
        with pytest.raises(ValueError, match="must end with a user turn"):
            judge.score([[{"role": "assistant", "content": "hi"}]], ["5"])
        # too long for data.max_length: flagged, not judged
        (long,) = judge.score(["hi"], ["word " * 3000])
        assert long.score is None and long.error == "too_long"


@pytest.mark.slow
def test_python_api_btpo_thoughts_and_seeded_samples(trained) -> None:
    from btpo_cli import load_judge

    run = trained("btpo")
    prompt = "What is 7 - 3 + 4?"
    with load_judge(run, device="cpu", max_new_tokens=8) as judge:
        scores = judge.score([prompt, prompt], ["7 - 3 + 4 = 8.", "7 - 3 + 4 = 9."])
        for s in scores:
            assert 0 < s.score < 1 and isinstance(s.thought, str) and s.detail["thought_tokens"] <= 8
            assert s.score == s.detail["p_yes"]
        c = judge.compare(prompt, "7 - 3 + 4 = 8.", "7 - 3 + 4 = 9.")
        a, b = scores[0].score, scores[1].score
        assert c.prob_a == pytest.approx(a / (a + b), abs=1e-5)                 # Bradley–Terry on p(Yes)
    with load_judge(run, device="cpu", max_new_tokens=8, samples=3, seed=7) as judge:
        alone = judge.score([prompt], ["7 - 3 + 4 = 8."])[0]
        together = judge.score([prompt, prompt], ["7 - 3 + 4 = 9.", "7 - 3 + 4 = 8."])[1]
        assert len(alone.detail["sampled_thoughts"]) == 3
        assert alone.score == pytest.approx(sum(alone.detail["sampled_p_yes"]) / 3, abs=1e-6)
        # seeds are named by the text: the same response samples the same thoughts in any batch
        assert alone.detail["sampled_thoughts"] == together.detail["sampled_thoughts"]
        assert alone.score == pytest.approx(together.score, abs=1e-4)


@pytest.mark.slow
def test_python_api_pairwise_and_format_errors(trained) -> None:
    from btpo_cli import load_judge
    from btpo_cli.errors import BtpoError
    from btpo_cli.judging.parsers import SCORE_ERRORS

    with load_judge(trained("gram"), device="cpu") as judge:
        with pytest.raises(BtpoError, match="pairwise"):
            judge.score(["What is 2 + 3?"], ["5"])
        c = judge.compare("What is 2 + 3?", "5", "6")
        assert c.orders[0] in ("A", "B", "tie") and c.orders[1] in ("A", "B", "tie")
        p_ab, p_ba = c.detail["p_ab"], c.detail["p_ba"]
        assert c.prob_a == pytest.approx((p_ab[0] / sum(p_ab) + p_ba[1] / sum(p_ba)) / 2, abs=1e-6)
        rev = judge.compare("What is 2 + 3?", "6", "5")                       # the same two prompts, swapped
        assert c.prob_a + rev.prob_a == pytest.approx(1.0, abs=1e-5)
        best = judge.best_of_n("What is 2 + 3?", ["5", "6", "4"])
        assert sum(best.scores) == pytest.approx(1.5, abs=1e-5)              # 3 games, one point each, / (n - 1)
        assert best.best == max(range(3), key=lambda i: (best.scores[i], -i))
    with load_judge(trained("grpo-point"), device="cpu", max_new_tokens=8) as judge:
        scores = judge.score(["What is 2 + 3?"] * 2, ["5", "6"])
        for s in scores:                                          # a tiny model does not write <score>N</score>
            assert isinstance(s.thought, str)
            assert (s.score is None) == (s.error is not None)
            assert s.error is None or s.error in SCORE_ERRORS
        assert judge.best_of_n("What is 2 + 3?", ["5", "6"]).best is None or scores[0].score is not None


@pytest.mark.slow
def test_reward_function_takes_trl_formats(trained) -> None:
    from btpo_cli import load_judge

    with load_judge(trained("bt"), device="cpu") as judge:
        f = judge.reward_function()
        plain = f(prompts=["What is 2 + 3?", "What is 1 + 1?"], completions=["5", "2"], trainer_state=None)
        conv = f(prompts=[[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "What is 1 + 1?"}]],
                 completions=[[{"role": "assistant", "content": "5"}], [{"role": "assistant", "content": "2"}]])
        assert plain == pytest.approx(conv, abs=1e-6) and len(plain) == 2
        assert plain == pytest.approx([s.score for s in judge.score(["What is 2 + 3?", "What is 1 + 1?"], ["5", "2"])],
                                      abs=1e-5)
        assert f.__name__ == "btpo_bt"
    with load_judge(trained("gram"), device="cpu") as judge:
        r = judge.reward_function()(prompts=["q"] * 3 + ["p"], completions=["a", "b", "c", "d"])
        assert sum(r[:3]) == pytest.approx(1.5, abs=1e-5) and r[3] == 0.0   # a lone completion has no opponent


# ----------------------------------------------------------------------------- checkpoints and the CLI


@pytest.mark.slow
def test_old_checkpoint_loads_from_the_run_config(trained, tmp_path: Path) -> None:
    from btpo_cli import load_judge

    run = tmp_path / "old"
    shutil.copytree(trained("bt"), run)
    with load_judge(run, device="cpu") as judge:
        new = [s.score for s in judge.score(["What is 2 + 3?"] * 2, ["5", "6"])]
    (run / "final" / "btpo.json").write_text(json.dumps(
        {"method": "bt", "base_model": "tiny-qwen2", "model_class": "AutoModelForSequenceClassification"}))
    with load_judge(run, device="cpu") as judge:
        assert judge.aspect == "correct"                       # read from the run's training data
        assert [s.score for s in judge.score(["What is 2 + 3?"] * 2, ["5", "6"])] == pytest.approx(new, abs=1e-6)
    bare = tmp_path / "bare"
    shutil.copytree(run / "final", bare)
    with pytest.warns(UserWarning, match="predates"), load_judge(bare, device="cpu") as judge:
        assert judge.cfg.data.max_length == 1024 and judge.aspect == "helpful and harmless"


@pytest.mark.slow
def test_model_card_snippet_runs_with_plain_transformers(trained) -> None:
    from btpo_cli import load_judge

    final = trained("bt") / "final"
    card = (final / "README.md").read_text()
    code = card.split("## Use it with plain transformers")[1].split("```python")[1].split("```")[0]
    p = subprocess.run([sys.executable, "-c", code + "\nprint(reward)"], cwd=final, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    with load_judge(final, device="cpu") as judge:
        (s,) = judge.score(["What is 2 + 3?"], ["5"])
    assert float(p.stdout.split()[-1]) == pytest.approx(s.score, abs=1e-5)


@pytest.mark.slow
def test_score_cli_lines_errors_and_pipes(trained, tmp_path: Path) -> None:
    run = trained("bt")
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join([
        json.dumps({"id": "q1", "prompt": "What is 2 + 3?", "response": "5"}),
        "{not json",
        json.dumps({"prompt": "What is 2 + 3?", "candidates": ["6", "5", "4"], "aspect": "correct"}),
        json.dumps({"prompt": "What is 2 + 3?", "response": 5}),
        "",
        json.dumps({"prompt": [{"role": "user", "content": "hi"}], "candidates": []}),
        json.dumps({"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6", "aspect": "correct"}),
        json.dumps(["a list"]),
    ]) + "\n")
    p = run_btpo("score", "--judge", str(run), str(inp), env=ONE_THREAD)
    every = [json.loads(x) for x in p.stdout.splitlines()]         # one line per input line, bad ones too
    assert [r["line"] for r in every] == list(range(1, 9))
    rows = [r for r in every if set(r) - {"line", "id", "error"}]
    assert [r["line"] for r in rows] == [1, 3, 7]
    assert rows[0]["id"] == "q1" and isinstance(rows[0]["score"], float)
    assert rows[1]["best"] in (0, 1, 2) and len(rows[1]["scores"]) == 3
    assert rows[2]["credit"] in (0.0, 0.5, 1.0) and {"chosen", "rejected"} <= set(rows[2])
    err = p.stderr
    assert "in.jsonl:2: invalid JSON" in err
    assert "in.jsonl:4 field 'response': expected a string, got int" in err
    assert "in.jsonl:6 field 'candidates': expected a non-empty list of strings" in err
    assert "in.jsonl:8: expected a JSON object, got list" in err
    assert "btpo score: 5 of 8 line(s) had errors (first: line 2: invalid JSON" in err     # 4 and the blank line
    assert "Traceback" not in err

    p = run_btpo("score", "--judge", str(run), str(inp), "--strict", check=False)
    assert p.returncode == 1 and "in.jsonl:2: invalid JSON" in p.stderr and "Traceback" not in p.stderr

    # stdin in, a reader that leaves early: no traceback, exit 0
    lines = "".join(json.dumps({"prompt": f"What is {i} + 1?", "response": str(i + 1)}) + "\n" for i in range(300))
    script = (f"{sys.executable} -m btpo_cli score --judge {run} - --quiet --batch-size 2 | head -n 1")
    q = subprocess.run(["bash", "-c", f"set -o pipefail; {script}"], input=lines, capture_output=True, text=True,
                       cwd=REPO, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO), **ONE_THREAD})
    assert q.returncode == 0, q.stderr
    assert len(q.stdout.splitlines()) == 1 and json.loads(q.stdout)["line"] == 1
    assert "Traceback" not in q.stderr and "Exception ignored" not in q.stderr

    p = run_btpo("score", "--judge", str(trained("gram")), str(inp), env=ONE_THREAD)
    assert "field 'response': gram is a pairwise judge" in p.stderr
    every = [json.loads(x) for x in p.stdout.splitlines()]
    assert [r["line"] for r in every] == list(range(1, 9))
    assert [r["line"] for r in every if "error" not in r] == [3, 7]
