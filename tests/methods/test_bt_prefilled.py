"""BT-prefilled: the thought cache (written once, reused on resume and re-evaluation, regenerated only
where the pair or the writer changed), the BT input, and train → kill → resume → eval end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import run_btpo

SMALL = ["--set", "train.batch_size=4", "--set", "train.micro_batch_size=2", "--set", "optim.lr=1e-3",
         "--set", "optim.warmup_ratio=0", "--set", "data.max_length=256", "--set", "prefilled.max_thought_tokens=6",
         "--set", "prefilled.batch_size=64"]


class FakeWriter:
    """Stands in for the base model; counts the records it is asked to write for."""

    written: list[str] = []

    def __init__(self, spec: Any, device: Any):
        self.spec = spec

    def write(self, records: list[Any]) -> list[dict[str, Any]]:
        FakeWriter.written.extend(r.id for r in records)
        return [{"id": r.id, "digest": self.spec.digest(r), "thought_chosen": f"good {r.id}",
                 "thought_rejected": f"bad {r.id}", "tokens": [3, -6]} for r in records]


def _records(n: int) -> list[Any]:
    from btpo_cli.data.pairs import PairRecord

    return [PairRecord(f"p{i}", [{"role": "user", "content": f"q{i}"}], [{"role": "assistant", "content": f"y{i}"}],
                       [{"role": "assistant", "content": f"n{i}"}]) for i in range(n)]


def test_cache_written_once_and_reused(tmp_path: Path) -> None:
    from btpo_cli.config import Config
    from btpo_cli.methods.bt_prefilled import _spec, ensure_thoughts, thought_stats

    spec = _spec(Config())
    path = tmp_path / "thoughts.jsonl"
    recs = _records(5)
    FakeWriter.written = []
    got, counts = ensure_thoughts(recs, path, spec, torch.device("cpu"), make_writer=FakeWriter)
    assert counts == {"cached": 0, "generated": 5} and sorted(FakeWriter.written) == [r.id for r in recs]
    assert got["p3"]["thought_chosen"] == "good p3" and len(path.read_text().splitlines()) == 5
    stats = thought_stats(list(got.values()), spec.max_thought_tokens)
    assert stats["prefilled/thought_len"] == 4.5 and stats["prefilled/thought_cut_fraction"] == 0.5

    FakeWriter.written = []
    again, counts = ensure_thoughts(recs, path, spec, torch.device("cpu"), make_writer=FakeWriter)
    assert counts == {"cached": 5, "generated": 0} and FakeWriter.written == [] and again == got

    # a changed pair, a new pair and a line cut by a kill: only those are written again
    recs[1].chosen[-1]["content"] = "changed"
    with open(path, "a") as f:
        f.write('{"id": "p4", "dig')
    FakeWriter.written = []
    _, counts = ensure_thoughts(recs + _records(7)[5:], path, spec, torch.device("cpu"), make_writer=FakeWriter)
    assert sorted(FakeWriter.written) == ["p1", "p5", "p6"] and counts["cached"] == 4

    # another writer or budget invalidates every line
    other = _spec(Config(), max_thought_tokens=7)
    FakeWriter.written = []
    ensure_thoughts(recs, path, other, torch.device("cpu"), make_writer=FakeWriter)
    assert len(FakeWriter.written) == 5


def test_encode_prefilled_keeps_response_and_thought() -> None:
    from btpo_cli.judging.templates import EVAL_INSTRUCTION
    from btpo_cli.methods.bt_prefilled import encode_prefilled
    from btpo_cli.models.loading import load_tokenizer

    tok = load_tokenizer("tiny-qwen2")
    recs = _records(3)
    recs[0].prompt[0]["content"] = "long " * 300 + "question"
    rows = {r.id: {"thought_chosen": f"good {r.id}", "thought_rejected": f"bad {r.id}"} for r in recs}
    rows["p2"]["thought_rejected"] = None                                   # not written: too long to judge
    pairs, stats = encode_prefilled(tok, recs, rows, 128)
    assert [p.index for p in pairs] == [0, 1] and stats == {"truncated": 2, "too_long": 1}
    text = tok.decode(pairs[0].chosen)
    assert len(pairs[0].chosen) <= 128 and "question" in text and "long long" in text
    assert text.index("y0") < text.index(EVAL_INSTRUCTION.format(aspect=recs[0].aspect)) < text.index("good p0")
    assert "bad p1" in tok.decode(pairs[1].rejected) and "n1" in tok.decode(pairs[1].rejected)


@pytest.mark.slow
def test_train_resume_eval_reuse_thoughts(tmp_path: Path, synthetic_data: Path) -> None:
    run_dir = tmp_path / "btp"
    args = ["train", "--method", "bt-prefilled", "--data", str(synthetic_data), "--max-steps", "4",
            "--set", "train.save_every=2", *SMALL]
    p = run_btpo(*args, "--out", str(run_dir), env={"BTPO_FAULT_AT_STEP": "3"}, check=False)
    assert p.returncode == 17
    cache = run_dir / "prefilled_thoughts.train.jsonl"
    assert "0 cached, 96 generated" in p.stdout + p.stderr
    assert len(cache.read_text().splitlines()) == 96
    before = (cache.stat().st_mtime_ns, cache.read_bytes())

    p = run_btpo("train", "--out", str(run_dir), "--resume")
    assert "96 cached, 0 generated" in p.stdout + p.stderr
    assert (cache.stat().st_mtime_ns, cache.read_bytes()) == before
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    assert next(r for r in rows if "prefilled/generated" in r)["prefilled/generated"] == 96

    meta = json.loads((run_dir / "final" / "btpo.json").read_text())
    assert meta["method"] == "bt-prefilled" and meta["thought_writer"] == "tiny-qwen2"
    assert meta["max_thought_tokens"] == 6
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(run_dir / "final")

    p = run_btpo("eval", "--checkpoint", str(run_dir))
    assert "0 cached, 24 generated" in p.stdout + p.stderr
    summary = json.loads((run_dir / "eval" / "synthetic.json").read_text())
    assert summary["method"] == "bt-prefilled" and summary["protocol"] == "pointwise" and summary["n"] == 24
    assert len((run_dir / "eval" / "synthetic.prefilled_thoughts.jsonl").read_text().splitlines()) == 24
    # the writer's training budget, whatever eval.max_new_tokens says
    assert summary["eval_settings"]["thought_budget"] == 6
    assert summary["eval_settings"]["thought_budget_from"] == "training"
    p = run_btpo("eval", "--checkpoint", str(run_dir))
    assert "24 cached, 0 generated" in p.stdout + p.stderr
