"""The synthetic reasoning-judge task and the pre-training dialogs of tiny-thinker."""

from __future__ import annotations

import json
import random
from pathlib import Path

from btpo_cli.data.synthetic import Expression, TaskSpec, careful_thought, make_pair, near_miss, wrong_thought
from data_builders.synthetic import build_synthetic


def test_expression_steps_and_value() -> None:
    e = Expression((7, 5, 9, 3), ("+", "-", "+"))
    assert e.text == "7 + 5 - 9 + 3"
    assert e.steps() == [(7, "+", 5, 12), (12, "-", 9, 3), (3, "+", 3, 6)]
    assert e.value == 6
    assert careful_thought(e, 7) == ("Let me check. 7 + 5 = 12. 12 - 9 = 3. 3 + 3 = 6. The result is 6. "
                                     "The response says 7. 7 - 6 = 1, so it is wrong.")
    assert careful_thought(e, 6).endswith("The response says 6. 6 - 6 = 0, so it is right.")


def test_wrong_thought_has_exactly_one_slip() -> None:
    rng = random.Random(0)
    for _ in range(50):
        e = Expression((rng.randint(0, 9), rng.randint(0, 9), rng.randint(0, 9)), ("+", "-"))
        t = wrong_thought(rng, e, 5)
        steps = [s.strip() for s in t.split("The result")[0].removeprefix("Let me check.").split(".") if s.strip()]
        bad = 0
        for s in steps:
            lhs, rhs = s.split("=")
            a, op, b = lhs.split()
            bad += int((int(a) + int(b) if op == "+" else int(a) - int(b)) != int(rhs))
        assert bad == 1


def test_pairs_near_miss_and_label_noise(tmp_path: Path) -> None:
    rng = random.Random(1)
    for _ in range(200):
        v = rng.randint(-30, 30)
        assert near_miss(rng, v) != v
    m = build_synthetic(tmp_path / "a", n_train=400, n_test=50, seed=3, label_noise=0.25)
    assert 60 < m["label_flipped"]["train"] < 140 and m["label_flipped"]["test"] == 0
    rows = [json.loads(x) for x in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    for r in rows:
        chosen_val = int(r["chosen"][0]["content"].split("= ")[1].rstrip("."))
        assert (chosen_val == r["meta"]["value"]) != r["meta"]["label_flipped"]
    test = [json.loads(x) for x in (tmp_path / "a" / "test.jsonl").read_text().splitlines()]
    assert all(not r["meta"]["label_flipped"] for r in test)
    # deterministic
    build_synthetic(tmp_path / "b", n_train=400, n_test=50, seed=3, label_noise=0.25)
    assert (tmp_path / "a" / "train.jsonl").read_bytes() == (tmp_path / "b" / "train.jsonl").read_bytes()


def test_make_pair_spec() -> None:
    r = make_pair(random.Random(0), 0, "test", TaskSpec(digits=2, ops=2))
    assert r.prompt[0]["role"] == "system" and r.prompt[-1]["content"].count(" ") == 6
    assert r.aspect == "correct"


def test_pretraining_dialog_mask_covers_thought_and_answer() -> None:
    from btpo_cli.judging.templates import answer_token_id, end_of_turn_id
    from btpo_cli.models.loading import load_tokenizer
    from btpo_cli.models.thinker import ThinkerSpec, pretraining_example

    tok = load_tokenizer("tiny-qwen2")
    ids = {"yes": answer_token_id(tok, "Yes"), "no": answer_token_id(tok, "No"), "eot": end_of_turn_id(tok)}
    rng = random.Random(0)
    kinds = {"careful": 0, "lazy": 0}
    for _ in range(40):
        seq, mask = pretraining_example(rng, tok, ThinkerSpec(), ids)
        learned = tok.decode([t for t, m in zip(seq, mask, strict=True) if m])
        assert learned.endswith(("Yes<|im_end|>", "No<|im_end|>"))
        assert "Based on your evaluation" in tok.decode(seq) and "Based on" not in learned
        kinds["careful" if "The result is" in learned else "lazy"] += 1
        if "The result is" in learned:
            assert learned.split("<|im_end|>")[0].endswith(("so it is right.", "so it is wrong."))
    assert kinds["careful"] > 5 and kinds["lazy"] > 5
