"""``btpo build-data hh|import|math|if`` end to end, on small files in the exact upstream formats."""

from __future__ import annotations

import csv
import gzip
import json
import re
from pathlib import Path

import pytest

from tests.conftest import run_btpo

# ----------------------------------------------------------------------------- fixtures (upstream formats)


def _hh_line(i: int) -> dict[str, str]:
    prompt = (
        f"\n\nHuman: Hi, I have question number {i}.\n\nAssistant: Sure, ask away."
        f"\n\nHuman: What is {i} plus {i}?"
    )
    return {
        "chosen": prompt + f"\n\nAssistant: It is {2 * i}.",
        "rejected": prompt + f"\n\nAssistant: I don't know, maybe {i}.",
    }


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("upstream")
    for subset in ("harmless-base", "helpful-base"):
        for split, n in (("train", 12), ("test", 4)):
            d = root / "hh-rlhf" / subset
            d.mkdir(parents=True, exist_ok=True)
            with gzip.open(d / f"{split}.jsonl.gz", "wt", encoding="utf-8") as f:
                for i in range(n):
                    f.write(json.dumps(_hh_line(i + (100 if split == "test" else 0))) + "\n")
    # MetaMathQA: one JSON list (MetaMathQA-395K.json)
    mm = [
        {
            "query": f"What is {a} + {a}?",
            "response": f"{a} + {a} = {2 * a}.\nThe answer is: {2 * a}",
            "type": "GSM_Rephrased",
            "original_question": f"What is {a} + {a}?",
        }
        for a in range(1, 6)
    ]
    (root / "MetaMathQA-395K.json").write_text(json.dumps(mm, indent=1), encoding="utf-8")
    # GSM8K main test JSONL
    with open(root / "gsm8k_test.jsonl", "w", encoding="utf-8") as f:
        for a in range(1, 4):
            f.write(
                json.dumps(
                    {
                        "question": f"Tom has {a} apples and buys {a} more. How many?",
                        "answer": f"He has {a}+{a}=<<{a}+{a}={2 * a}>>{2 * a} apples.\n#### {2 * a}",
                    }
                )
                + "\n"
            )
    # MATH-500 test.jsonl
    (root / "math500").mkdir()
    with open(root / "math500" / "test.jsonl", "w", encoding="utf-8") as f:
        for a in range(1, 3):
            f.write(
                json.dumps(
                    {
                        "problem": f"Compute $\\frac{{{2 * a}}}{{2}}$.",
                        "solution": f"$\\boxed{{{a}}}$",
                        "answer": str(a),
                        "subject": "Algebra",
                        "level": 1,
                        "unique_id": f"test/algebra/{a}.json",
                    }
                )
                + "\n"
            )
    # AdvancedIF CSV with doubly encoded rubrics
    with open(root / "if_oss_full_data.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["conversation_history", "benchmark_name", "prompt_metadata"])
        for i in range(3):
            convo = [
                {"role": "system", "content": "Answer in one short sentence."},
                {"role": "user", "content": f"Name a colour, then the number {i}."},
            ]
            rubrics = json.dumps([f"Does the response mention the number {i}?", "Is it one sentence?"])
            w.writerow([json.dumps(convo), "if_system_steerability_oss", json.dumps({"rubrics": rubrics})])
    # a plain CSV of pairs for import
    with open(root / "pairs.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "good", "bad"])
        for i in range(40):
            w.writerow([f"Question {i}?", f"Good answer {i}.", f"Bad answer {i}."])
    return root


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- hh / import


def _built_twice(args: list[str], tmp_path: Path) -> dict:
    """Build into ``a`` and ``b`` with the same arguments; the files must be equal. Returns a's manifest."""
    run_btpo(*args, "--out", str(tmp_path / "a"))
    run_btpo(*args, "--out", str(tmp_path / "b"))
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    return _manifest(tmp_path / "a")


def test_hh_cli_deterministic_and_dry_run(fixtures: Path, tmp_path: Path) -> None:
    args = ["build-data", "hh", "--source", f"hh={fixtures / 'hh-rlhf'}",
            "--subsets", "helpful-base,harmless-base", "--n-train", "10", "--n-test", "3", "--seed", "3"]
    m = _built_twice(args, tmp_path)
    assert m["counts"] == {"train": 10, "test": 3}
    rec = json.loads((tmp_path / "a" / "train.jsonl").read_text().splitlines()[0])
    assert [t["role"] for t in rec["prompt"]] == ["user", "assistant", "user"]
    p = run_btpo(*args, "--out", str(tmp_path / "dry"), "--dry-run")
    assert not (tmp_path / "dry").exists()
    assert json.loads(p.stdout)["dry_run"] is True


def test_hh_cli_bad_source_is_one_line_error(tmp_path: Path) -> None:
    p = run_btpo("build-data", "hh", "--out", str(tmp_path / "x"), "--source", "nope=1", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "valid names: hh" in p.stderr   # bad usage


def test_import_cli(fixtures: Path, tmp_path: Path) -> None:
    args = ["build-data", "import", str(fixtures / "pairs.csv"), "--map", "prompt=question,chosen=good,rejected=bad",
            "--test-fraction", "0.25", "--aspect", "correct", "--seed", "1"]
    m = _built_twice(args, tmp_path)
    assert m["counts"]["train"] + m["counts"]["test"] == 40 and m["counts"]["test"] > 0
    run_btpo(*args, "--out", str(tmp_path / "dry"), "--dry-run")
    assert not (tmp_path / "dry").exists()


# ----------------------------------------------------------------------------- math


def _math_args(fixtures: Path, out: Path) -> list[str]:
    return [
        "build-data",
        "math",
        "--out",
        str(out),
        "--source",
        f"metamathqa={fixtures / 'MetaMathQA-395K.json'}",
        "--source",
        f"gsm8k={fixtures / 'gsm8k_test.jsonl'}",
        "--source",
        f"math500={fixtures / 'math500'}",
        "--generator",
        "tiny-qwen2",
        "--n-samples",
        "2",
        "--max-new-tokens",
        "16",
        "--batch-size",
        "2",
        "--limit",
        "2",
        "--device",
        "cpu",
        "--seed",
        "0",
    ]


def _cache_lines(out: Path) -> list[str]:
    return (out / ".cache" / "math-samples.jsonl").read_text(encoding="utf-8").splitlines()


@pytest.mark.slow
def test_math_cli_resume_after_kill_and_deterministic(fixtures: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    p = run_btpo(*_math_args(fixtures, out), env={"BTPO_FAULT_AFTER_BATCHES": "1"}, check=False)
    assert p.returncode == 75, p.stderr
    first = _cache_lines(out)
    assert len(first) == 2 and not (out / "manifest.json").exists()  # one batch of 2 questions survived
    p = run_btpo(*_math_args(fixtures, out))
    assert "cached=2" in p.stderr and "generated=4" in p.stderr and "batches=2" in p.stderr, p.stderr
    lines = _cache_lines(out)
    assert lines[:2] == first and len(lines) == 6  # finished batch kept, not regenerated
    m = _manifest(out)
    q = m["questions"]
    assert sum(c["questions"] for c in q.values()) == 6
    assert m["no_pair"] + sum(c["pairs"] for c in q.values()) == 6
    assert m["grading"]["samples"] == 12
    assert m["generator"]["generator"] == "tiny-qwen2" and m["grader"] in ("builtin", "math-verify")
    # a fresh build with the same seed gives the same files
    out2 = tmp_path / "m2"
    p = run_btpo(*_math_args(fixtures, out2))
    assert "cached=0" in p.stderr
    assert _files(out) == _files(out2)
    # dry run writes nothing
    p = run_btpo(*_math_args(fixtures, tmp_path / "dry"), "--dry-run")
    assert not (tmp_path / "dry").exists() and json.loads(p.stdout)["to_generate"] == 6


@pytest.mark.slow
def test_math_cli_shards_then_assemble(fixtures: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    run_btpo(*_math_args(fixtures, out), "--shard", "1/2")
    assert [p.name for p in (out / ".cache").iterdir()] == ["math-samples.shard-1-of-2.jsonl"]
    assert not (out / "manifest.json").exists()
    p = run_btpo(*_math_args(fixtures, out))  # samples the other shard's questions, then assembles
    assert "cached=3" in p.stderr and "generated=3" in p.stderr, p.stderr
    assert sum(c["questions"] for c in _manifest(out)["questions"].values()) == 6


class FakeSampler:
    """Deterministic generator: sample j of a question answers correctly iff j is even."""

    def __init__(self, fail_after: int | None = None):
        self.calls, self.fail_after = 0, fail_after

    def sample(self, prompts, n, *, temperature, top_p, max_new_tokens, seed, chat):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt
        out = []
        for p in prompts:
            first = int(re.findall(r"\d+", p.split("### Instruction:")[-1])[0])
            gold = first // 2 if "Compute" in p else 2 * first
            out.append(
                [(f"Step.\nThe answer is: {gold if j % 2 == 0 else gold + 100}", True) for j in range(n)]
            )
        return out


def test_math_builder_pairs_and_resume_with_fake_engine(fixtures: Path, tmp_path: Path) -> None:
    from data_builders.math_builder import build_math

    sources = {
        "metamathqa": str(fixtures / "MetaMathQA-395K.json"),
        "gsm8k": str(fixtures / "gsm8k_test.jsonl"),
        "math500": str(fixtures / "math500"),
    }
    kw = {"generator": "fake", "n_samples": 4, "batch_size": 2, "n_train": 0, "n_test": 0, "seed": 0}
    out = tmp_path / "m"
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C during the third batch
        build_math(out, sources, sampler=FakeSampler(fail_after=2), **kw)
    assert len(_cache_lines(out)) == 4
    s = FakeSampler()
    m = build_math(out, sources, sampler=s, **kw)
    assert s.calls == 3  # 10 questions in 5 batches of 2; 2 were finished before the interrupt
    assert m["generation_run"] == {"questions": 10, "cached": 4, "generated": 6, "batches": 3}
    assert m["counts"] == {"train": 5, "test": 5}
    assert m["grading"]["correct"] == m["grading"]["incorrect"] == 20 and m["no_pair"] == 0
    rec = json.loads((out / "train.jsonl").read_text().splitlines()[0])
    assert rec["aspect"] == "correct" and rec["prompt"][0]["role"] == "user"
    assert rec["meta"]["chosen_answer"] == rec["meta"]["gold"]
    assert rec["source"].startswith("metamathqa/")


# ----------------------------------------------------------------------------- if


@pytest.mark.slow
class UnmarkedSampler:
    """Solutions that never mark their answer: even samples end on the gold number, odd ones on another."""

    def sample(self, prompts, n, *, temperature, top_p, max_new_tokens, seed, chat):
        out = []
        for p in prompts:
            first = int(re.findall(r"\d+", p.split("### Instruction:")[-1])[0])
            gold = first // 2 if "Compute" in p else 2 * first
            out.append([(f"Some steps, then {gold if j % 2 == 0 else gold + 100}.", True) for j in range(n)])
        return out


def test_math_marked_only_grades_unmarked_solutions_as_no_answer(fixtures: Path, tmp_path: Path) -> None:
    """By default an unmarked solution's last number is its answer (pairs); with marked_only it has none."""
    from data_builders.math_builder import build_math

    sources = {"gsm8k": str(fixtures / "gsm8k_test.jsonl")}
    kw = {"generator": "fake", "n_samples": 4, "batch_size": 2, "n_train": 0, "n_test": 0, "seed": 0}
    m = build_math(tmp_path / "last", sources, sampler=UnmarkedSampler(), **kw)
    assert m["grading"]["correct"] == m["grading"]["incorrect"] > 0 and m["counts"]["test"] > 0
    assert m["answers"] == "marked, else the last number"
    m = build_math(tmp_path / "marked", sources, sampler=UnmarkedSampler(), marked_only=True, **kw)
    assert m["grading"]["correct"] == m["grading"]["incorrect"] == 0
    assert m["grading"]["no_answer"] == m["grading"]["samples"] > 0 and m["counts"]["test"] == 0
    assert m["answers"] == "marked only"


def test_if_cli_tiny(fixtures: Path, tmp_path: Path) -> None:
    args = [
        "build-data",
        "if",
        "--source",
        f"advancedif={fixtures / 'if_oss_full_data.csv'}",
        "--generator",
        "tiny-qwen2",
        "--judge",
        "tiny-qwen2",
        "--n-samples",
        "2",
        "--max-new-tokens",
        "8",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--seed",
        "0",
    ]
    run_btpo(*args, "--out", str(tmp_path / "a"))
    m = _manifest(tmp_path / "a")
    assert m["prompts"] == 3 and m["pairs"] + m["ties"] == 3
    assert m["judging"]["judgments"] == 3 * 2 * 2
    assert "CC-BY-NC-4.0" in m["license"]
    run_btpo(*args, "--out", str(tmp_path / "b"))
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    p = run_btpo(*args, "--out", str(tmp_path / "dry"), "--dry-run")
    assert not (tmp_path / "dry").exists() and json.loads(p.stdout)["counts"]["prompts"] == 3


class FakeJudge:
    def __init__(self):
        self.calls = 0

    def judge(self, prompts):
        self.calls += 1
        # "yes" iff the response (between the markers) contains the rubric's number
        out = []
        for p in prompts:
            text = p[0]["content"]
            resp = text.split("Response to the last user turn:\n", 1)[1].split("\n\nRubric:", 1)[0]
            rubric = text.split("Rubric: ", 1)[1]
            out.append("Yes" if ("number" in rubric and rubric.split("number ")[1][0] in resp) else "no.")
        return out


class FakeChatSampler:
    calls = 0

    def sample(self, prompts, n, *, temperature, top_p, max_new_tokens, seed, chat):
        assert chat
        res = []
        for p in prompts:
            num = p[-1]["content"].rstrip(".").split()[-1]
            res.append([(f"Blue {num}." if j == 0 else "Red.", True) for j in range(n)])
        return res


def test_if_builder_pairs_with_fake_judge(fixtures: Path, tmp_path: Path) -> None:
    from data_builders.if_builder import build_if

    out = tmp_path / "if"
    kw = {"n_samples": 3, "batch_size": 2, "test_fraction": 0.3, "seed": 0}
    j = FakeJudge()
    m = build_if(
        out,
        {"advancedif": str(fixtures / "if_oss_full_data.csv")},
        sampler=FakeChatSampler(),
        judge_impl=j,
        **kw,
    )
    assert m["pairs"] == 3 and m["ties"] == 0 and m["counts"] == {"train": 2, "test": 1}
    assert m["judging"]["satisfied"] == 3
    rec = json.loads((out / "train.jsonl").read_text().splitlines()[0])
    assert rec["chosen"][0]["content"].startswith("Blue") and rec["rejected"][0]["content"] == "Red."
    assert rec["aspect"] == "following all instructions"
    j2 = FakeJudge()  # cached: neither the generator nor the judge runs again
    build_if(
        out,
        {"advancedif": str(fixtures / "if_oss_full_data.csv")},
        sampler=None,
        judge_impl=j2,
        generator="qwen2.5-7b",
        **kw,
    )
    assert j2.calls == 0


def test_url_judge_failure_names_url() -> None:
    from btpo_cli.errors import BtpoError
    from data_builders.if_builder import URLJudge

    with pytest.raises(BtpoError, match=r"http://127\.0\.0\.1:9/v1/chat/completions"):
        URLJudge("http://127.0.0.1:9/v1", "m", timeout=2).ask([{"role": "user", "content": "hi"}])
