"""train.packing: padding-free rows give the padded path's losses and every parameter's gradient (BT and
BT-prefilled share ``bt.rewards``; GRAM ``gram.label_logprobs``), with mixed lengths, LoRA and rows cut by
a token budget; length-grouped micro-batches keep each step's units; the judges score alike.

Bound: tests/invariants/tolerances.py ``packing_bound`` (the same float32 products summed in another
order; ``n`` = the micro-batch's tokens)."""

from __future__ import annotations

import pytest
import torch

from btpo_cli.config import build_config
from btpo_cli.errors import BtpoError, ConfigError
from btpo_cli.losses import bt_loss, gram_loss
from btpo_cli.methods import bt, gram
from btpo_cli.models import packing
from btpo_cli.models.inputs import pad_batch
from btpo_cli.models.loading import load_causal_lm, load_reward_model
from btpo_cli.training.steps import micro_batches
from tests.invariants.tolerances import packing_bound

LENGTHS = (23, 5, 41, 1, 17, 30, 9, 12)
"""Mixed lengths: one token, short and long sequences in one micro-batch (4 pairs)."""


def _cfg(method: str, lora: bool, *sets: str):
    extra = ["model.lora.r=4", "model.lora.dropout=0.0"] if lora else []
    return build_config(flags={"method": method}, overrides=["model.name=tiny-qwen2", *extra, *sets])


def _ready(model):
    with torch.no_grad():                      # LoRA's B starts at 0: give the adapter a real gradient path
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return model.train()


def _seqs(vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in LENGTHS]


def _both(model, loss_of) -> tuple[float, float]:
    """loss_of(packed) for off and on: |Δloss| and max |Δgrad| as fractions of the packing bound."""
    res = {}
    for packed in (False, True):
        model.zero_grad(set_to_none=True)
        loss = loss_of(packed)
        loss.backward()
        res[packed] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (l0, g0), (l1, g1) = res[False], res[True]
    assert g0.keys() == g1.keys() and g0
    n = sum(LENGTHS)
    tol_g = packing_bound(n, max(float(g.abs().max()) for g in g0.values()))
    return (float((l0 - l1).abs()) / packing_bound(n, max(1.0, float(l0.abs()))),
            max(float((g0[k] - g1[k]).abs().max()) for k in g0) / tol_g)


@pytest.mark.parametrize("lora,budget", [(False, None), (True, None), (False, 50)])
def test_bt_loss_and_grads_packed_equal_padded(lora: bool, budget: int | None) -> None:
    """BT and BT-prefilled (the same ``bt.rewards``, longer sequences): loss and every gradient."""
    cfg = _cfg("bt", lora)
    torch.manual_seed(0)
    model = _ready(load_reward_model(cfg.model, 0))
    seqs = _seqs(model.config.vocab_size)
    m = len(seqs) // 2

    def loss_of(packed: bool) -> torch.Tensor:
        r = bt.rewards(model, seqs, 0, "cpu", packed, budget)
        return bt_loss(r[:m], r[m:])

    dl, dg = _both(model, loss_of)
    assert dl <= 1 and dg <= 1, (dl, dg)


@pytest.mark.parametrize("lora,budget", [(False, None), (True, 60)])
def test_gram_loss_and_grads_packed_equal_padded(lora: bool, budget: int | None) -> None:
    cfg = _cfg("gram", lora)
    torch.manual_seed(0)
    model = _ready(load_causal_lm(cfg.model))
    seqs = _seqs(model.config.vocab_size, seed=1)
    labels = gram.Labels(7, 8)
    target = torch.arange(len(seqs)) < len(seqs) // 2

    def loss_of(packed: bool) -> torch.Tensor:
        la, lb = gram.label_logprobs(model, seqs, labels, 0, "cpu", packed, budget)
        return gram_loss(la, lb, target, 0.1).mean()

    dl, dg = _both(model, loss_of)
    assert dl <= 1 and dg <= 1, (dl, dg)


def test_token_logprobs_equal_padded() -> None:
    torch.manual_seed(0)
    model = load_causal_lm(_cfg("gram", False).model).eval()
    seqs = _seqs(model.config.vocab_size, seed=2)
    with torch.no_grad():
        got = packing.token_logprobs(model, seqs, "cpu", budget=40)
        ids, mask = pad_batch(seqs, 0, "cpu")
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
    assert [len(t) for t in got] == [n - 1 for n in LENGTHS]
    for i, t in enumerate(got):
        want = logp[i, :LENGTHS[i] - 1].gather(-1, ids[i, 1:LENGTHS[i], None])[:, 0]
        tol = packing_bound(sum(LENGTHS), max([1.0, *want.abs().tolist()]))
        assert torch.allclose(t, want, atol=tol, rtol=0), (i, float((t - want).abs().max()))


def test_packed_rows_respect_the_budget_and_keep_every_sequence() -> None:
    rows = packing.pack([[1] * n for n in LENGTHS], "cpu", budget=40)
    assert sorted(i for r in rows for i in r.seqs) == list(range(len(LENGTHS)))
    for r in rows:
        assert r.input_ids.shape[1] == r.bounds[-1] == sum(LENGTHS[i] for i in r.seqs)
        assert r.bounds[-1] <= 40 or len(r.seqs) == 1
        assert r.position_ids[0].tolist() == [p for i in r.seqs for p in range(LENGTHS[i])]


def test_length_grouped_micro_batches_keep_the_step_units() -> None:
    sizes = {i: [n, LENGTHS[-1 - i]] for i, n in enumerate(LENGTHS)}
    cfg = _cfg("bt", False, "train.micro_batch_size=3")
    ids = [5, 0, 7, 2, 3, 6, 1, 4]
    plain = micro_batches(ids, cfg, sizes.__getitem__)
    packed = micro_batches(ids, cfg, sizes.__getitem__, packed=True)
    assert sorted(i for mb in packed for i in mb) == sorted(ids) and [len(mb) for mb in packed] == [3, 3, 2]
    flat = [sum(sizes[i]) for mb in packed for i in mb]
    assert flat == sorted(flat) and plain == [ids[:3], ids[3:6], ids[6:]]
    cfg.train.micro_batch_tokens = 60          # packed: a micro-batch's tokens are its rows' sum
    for mb in micro_batches(ids, cfg, sizes.__getitem__, packed=True):
        assert sum(sum(sizes[i]) for i in mb) <= 60 or len(mb) == 1


def test_packing_setting_is_validated_and_on_raises_where_it_cannot_apply() -> None:
    assert _cfg("bt", False).train.packing == "off"
    assert build_config(flags={"method": "bt"}, overrides=["train.packing=auto"]).train.packing == "auto"
    with pytest.raises(ConfigError, match="train.packing"):
        build_config(flags={"method": "bt"}, overrides=["train.packing=yes-please"])
    torch.manual_seed(0)
    model = load_reward_model(_cfg("bt", False).model, 0)
    assert packing.resolve("on", model) and not packing.resolve("off", model)
    model.gradient_checkpointing_enable()
    assert not packing.resolve("auto", model)
    with pytest.raises(BtpoError, match="train.packing=on: gradient checkpointing"):
        packing.resolve("on", model)


def test_plan_counts_a_packed_micro_batch_without_mask() -> None:
    """``btpo plan``: packed, the micro-batch's tokens are summed (as many as padded at the worst case)
    and the (N, 1, T, T) mask is gone. A rollout method packs each prompt once with its K continuations
    (tests/judging/test_packed_prefix.py checks that plan in detail): fewer tokens, a smaller peak."""
    from btpo_cli.plan.estimate import activations, geometry, inputs_from_config

    acts = {}
    for method in ("bt", "gram", "btpo"):
        for setting in ("off", "auto"):
            cfg = build_config(flags={"method": method}, overrides=["model.name=smollm2-135m",
                                                                   f"train.packing={setting}"])
            inp = inputs_from_config(cfg, device="cpu")
            assert inp.packing == (setting != "off")
            acts[method, setting] = activations(inp, geometry(inp), False)
    for method in ("bt", "gram"):
        off, on = acts[method, "off"], acts[method, "auto"]
        assert on["tokens"] == off["tokens"] and off["masks"] > 0 == on["masks"] and on["peak"] < off["peak"]
    off, on = acts["btpo", "off"], acts["btpo", "auto"]
    assert on["tokens"] < off["tokens"] and on["peak"] < off["peak"]


@pytest.mark.parametrize("method", ["bt", "gram"])
def test_judge_packed_equals_padded(method: str, synthetic_data) -> None:
    """``btpo eval`` / ``btpo score`` / ``btpo serve`` batches: the same credits and scores (within the bound)."""
    from btpo_cli.data.pairs import read_pairs
    from btpo_cli.models.aliases import resolve_model

    records = read_pairs(synthetic_data, "test")[0][:12]
    cfg = _cfg(method, False, "eval.batch_size=6")
    torch.manual_seed(0)
    model = (load_reward_model(cfg.model, 0) if method == "bt" else load_causal_lm(cfg.model)).eval()
    judge_cls = bt.RewardJudge if method == "bt" else gram.GramJudge
    got = {}
    for setting in ("off", "on"):
        cfg.train.packing = setting
        judge = judge_cls(resolve_model(cfg.model.name), cfg, torch.device("cpu"), {"aspect": "helpfulness"},
                          module=model)
        assert judge.packed == (setting == "on")
        got[setting] = judge.evaluate_pairs(records)
    tol = packing_bound(12 * 2 * cfg.data.max_length, 1.0)
    assert [(r.id, r.credit) for r in got["off"]] == [(r.id, r.credit) for r in got["on"]]
    for a, b in zip(got["off"], got["on"], strict=True):
        for key, v in a.detail.items():
            if isinstance(v, float):
                assert abs(v - b.detail[key]) <= tol * max(1.0, abs(v)), (a.id, key, v, b.detail[key])
