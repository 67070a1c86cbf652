"""Which term of the BTPO surrogate moves log p(Yes) of the chosen responses, and which way?

Runs ``btpo train`` unchanged, except that every ``--every``-th micro-batch also computes, on the
same micro-batch and weights, the parameter gradient of each of the four terms

    score_w  = −ω̂ Σ_k p̄^w_k log p(Yes|z^w_k)          score_l  = +ω̂ Σ_k p̄^l_k log p(Yes|z^l_k)
    thought_w = (1/K) Σ_k clipped surrogate of y_w     thought_l = the same for y_l

(their sum is the loss) and of ``h_w`` = mean log p(Yes) over the chosen responses' thoughts (and
``h_l`` for the rejected). It logs each term's gradient norm and its first-order effect on
``h_w`` / ``h_l`` for one optimizer step: ``Δh = −lr · ⟨∇h, P g_T⟩`` with ``P`` Adam's
preconditioner ``1/(sqrt(v̂)+eps)`` from the optimizer state (plain gradient descent, ``P = 1``,
before Adam has a state). A diagnostic, not a test: it re-runs the forward pass of the probed
micro-batches and several backward passes, so it is ~3× slower than training.

Usage (writes <out>/terms.jsonl beside the run's metrics.jsonl)::

    python bench/btpo_terms_probe.py --every 2 -- train --method btpo --model PATH --data DIR --out RUN \\
        --set ... (any ``btpo train`` arguments)

It wraps ``btpo_cli.methods.btpo.micro_loss`` and ``btpo_cli.training.session.make_optimizer``; if those move, move it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import btpo_cli.methods.btpo as M  # noqa: E402
import btpo_cli.training.session as S  # noqa: E402
from btpo_cli.judging.logprobs import score_thoughts  # noqa: E402
from btpo_cli.losses import clipped_surrogate, rollout_weights, score_loss  # noqa: E402

STATE: dict[str, Any] = {"opt": None, "calls": 0, "every": 2, "out": None}


def _make_optimizer(model: Any, cfg: Any) -> Any:
    opt = ORIG_MAKE_OPT(model, cfg)
    STATE["opt"], STATE["lr"], STATE["betas"], STATE["eps"] = opt, cfg.optim.lr, (0.9, 0.999), 1e-8
    for g in opt.param_groups:
        STATE["betas"], STATE["eps"] = g.get("betas", STATE["betas"]), g.get("eps", STATE["eps"])
    return opt


def _terms(model: Any, ro: Any, pair_ids: list[int], judge: Any, cfg: Any, device: Any) -> dict[str, torch.Tensor]:
    k = cfg.rollout.n
    rows = torch.tensor([(i * 2 + r) * k + j for i in pair_ids for r in range(2) for j in range(k)])
    sc = score_thoughts(model, ro.seqs.select(rows), judge.yes_id, judge.no_id, judge.pad_id, cfg.btpo.yes_no_normalize,
                        cfg.rollout.temperature)
    m = len(pair_ids)
    old = ro.old_logp[rows, :sc.logp.shape[1]].to(device)
    lp_yes = sc.logp_yes.view(m, 2, k)
    omega, pbar, adv = rollout_weights(ro.payload.old_logp_yes[pair_ids].to(device), cfg.btpo.thought_advantage,
                                       cfg.btpo.misalignment_weight)
    zero = torch.zeros_like(pbar[:, 0])
    seq, _ = clipped_surrogate(sc.logp, old, adv.reshape(-1), sc.mask, cfg.btpo.clip_eps_low, cfg.btpo.clip_eps_high,
                               cfg.btpo.agg, float(cfg.rollout.max_new_tokens))
    th = seq.view(m, 2, k).mean(-1)
    return {"score_w": score_loss(lp_yes[:, 0], lp_yes[:, 1], pbar[:, 0], zero, omega).mean(),
            "score_l": score_loss(lp_yes[:, 0], lp_yes[:, 1], zero, pbar[:, 1], omega,
                                  cfg.btpo.score_floor).mean(),
            "thought_w": th[:, 0].mean(), "thought_l": th[:, 1].mean(),
            "h_w": lp_yes[:, 0].mean(), "h_l": lp_yes[:, 1].mean()}


def _micro_loss(model: Any, ro: Any, pair_ids: list[int], judge: Any, cfg: Any, device: Any) -> Any:
    loss, stats = ORIG_MICRO(model, ro, pair_ids, judge, cfg, device)
    STATE["calls"] += 1
    if STATE["calls"] % STATE["every"]:
        return loss, stats
    params = [p for p in model.parameters() if p.requires_grad]
    t = _terms(model, ro, pair_ids, judge, cfg, device)
    grads = {name: torch.autograd.grad(v, params, retain_graph=True, allow_unused=True) for name, v in t.items()}
    opt = STATE["opt"]
    pre = []
    for p in params:
        st = opt.state.get(p, {}) if opt is not None else {}
        if "exp_avg_sq" in st:
            step = float(st["step"])
            v_hat = st["exp_avg_sq"] / (1 - STATE["betas"][1] ** step)
            pre.append(1.0 / (v_hat.sqrt() + STATE["eps"]))
        else:
            pre.append(None)

    def dot(a: Any, b: Any, precondition: bool) -> float:
        tot = 0.0
        for x, y, d in zip(a, b, pre, strict=True):
            if x is None or y is None:
                continue
            tot += float(((x * y) * (d if precondition and d is not None else 1.0)).sum())
        return tot

    rec: dict[str, Any] = {"call": STATE["calls"], "adam": pre[0] is not None,
                           **{f"value/{n}": float(v) for n, v in t.items()}}
    lr = STATE["lr"]
    for n in ("score_w", "score_l", "thought_w", "thought_l"):
        rec[f"gnorm/{n}"] = dot(grads[n], grads[n], False) ** 0.5
        for h in ("h_w", "h_l"):
            # first-order change of h from one step along −P g_n
            rec[f"dh/{h}/{n}"] = -lr * dot(grads[h], grads[n], True)
    for k in ("omega_mean", "score_chosen", "score_rejected", "pair_accuracy"):
        rec[k] = float(stats[k])
    with open(STATE["out"], "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
    return loss, stats


ORIG_MICRO = M.micro_loss
ORIG_MAKE_OPT = S.make_optimizer


def main() -> None:
    argv = sys.argv[1:]
    if "--every" in argv:
        i = argv.index("--every")
        STATE["every"] = int(argv[i + 1])
        del argv[i:i + 2]
    if argv and argv[0] == "--":
        argv = argv[1:]
    out = Path(argv[argv.index("--out") + 1])
    out.mkdir(parents=True, exist_ok=True)
    STATE["out"] = out / "terms.jsonl"
    STATE["out"].unlink(missing_ok=True)
    M.micro_loss = _micro_loss
    S.make_optimizer = _make_optimizer
    from btpo_cli.cli import main as cli_main

    sys.argv = ["btpo", *argv]
    cli_main()


if __name__ == "__main__":
    main()
