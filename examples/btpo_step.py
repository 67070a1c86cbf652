"""One BTPO step, top to bottom, in plain torch + transformers (METHOD.md §2–§5).

What ``btpo train --method btpo`` does with one rollout batch under the library's defaults
(thought_advantage=grpo, agg=token-mean, clip ε 0.2/0.2, β = 0 so no KL term, T = 1, p(Yes) over
the full vocabulary, no score floor), as one file to read. The library spreads it over
methods/btpo.py, training/rollouts.py, judging/logprobs.py and losses.py;
tests/methods/test_btpo_step_example.py checks that this file's loss and gradients equal the
library's on the same thoughts. Left to the library: padded batches (one forward per sequence
here), minibatches and accumulation, several processes, seeded rollout engines, the lr schedule,
checkpoints, the optional KL term and score floor.

    python examples/btpo_step.py --model <folder or Hub id>     # no --model: btpo_cli's tiny-qwen2
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

# The library's defaults (BTPOConfig, RolloutConfig, btpo_loss); the test fails if they drift apart.
K = 4                    # thoughts per response
TEMPERATURE = 1.0        # sampling temperature; thought log-probs are taken at it too
CLIP_EPS_LOW, CLIP_EPS_HIGH = 0.2, 0.2
ADV_EPS = 1e-6           # (r − mean) / (std + ADV_EPS)
EVAL_INSTRUCTION = "Evaluate your previous response for {aspect}. Think it through step by step."
RATING_QUESTION = "Based on your evaluation, is the response {aspect}? Strict format: Yes/No"


# ---- §2 the dialog-based GPM: prompt turns, response, "evaluate", thought z, "Yes/No?", answer head
def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def gpm_prompt(tok, prompt, response, aspect):
    """(prefix, suffix) token ids around the thought: the prefix ends at the thought's generation head,
    the suffix closes the thought's turn, asks the rating question and opens the answer turn."""
    slot = "\u2063THOUGHT\u2063"
    msgs = prompt + [{"role": "assistant", "content": response},
                     {"role": "user", "content": EVAL_INSTRUCTION.format(aspect=aspect)},
                     {"role": "assistant", "content": slot},
                     {"role": "user", "content": RATING_QUESTION.format(aspect=aspect)}]
    head, _, tail = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True).partition(slot)
    return encode(tok, head), encode(tok, tail)


def special_ids(tok):
    """(yes_id, eot_id): "Yes" as the first token of an assistant turn, and the token closing a turn."""
    msgs = [{"role": "user", "content": "?"}]
    head = encode(tok, tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))

    def turn(text):   # the tokens after the generation head of an assistant turn holding `text`
        msgs_a = msgs + [{"role": "assistant", "content": text}]
        full = encode(tok, tok.apply_chat_template(msgs_a, tokenize=False))
        diff = [i for i, (a, b) in enumerate(zip(head, full, strict=False)) if a != b]
        return full[diff[0] if diff else min(len(head), len(full)):]

    return turn("Yes")[0], turn("ok")[len(encode(tok, "ok"))]


# ---- §5.1 sample K thoughts per response with the current ("old") weights
@torch.no_grad()
def sample_thoughts(model, prefix, k, eot_id, max_new_tokens, temperature=TEMPERATURE):
    """K thoughts z ~ π(·|x, y) (plain sampling: top-p 1, no top-k), each ending on EOT or cut."""
    ids = torch.tensor([prefix], device=model.device)
    gen = GenerationConfig(do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
                           num_return_sequences=k, max_new_tokens=max_new_tokens,
                           eos_token_id=eot_id, pad_token_id=eot_id)   # rows that stopped are padded with EOT
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)[:, len(prefix):]
    return [z[: z.index(eot_id) + 1] if eot_id in z else z for z in out.tolist()]


# ---- §2 one forward per (response, thought): log π(z_t | x, y, z_<t) and log p(Yes | x, y, z)
def score(model, prefix, thought, suffix, yes_id, eot_id, temperature=TEMPERATURE):
    """Returns ``(logp_z (len(thought),), logp_yes ())``; carries the graph when grad is enabled."""
    if thought and thought[-1] == eot_id and suffix[:1] == [eot_id]:
        suffix = suffix[1:]                                   # the thought's own EOT closes its turn
    ids = torch.tensor([prefix + thought + suffix], device=model.device)
    logits = model(input_ids=ids).logits[0]                   # (T, V)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    p, n = len(prefix), len(thought)
    z_logits = logits[p - 1: p - 1 + n] / temperature       # position t predicts token t + 1
    logp_z = z_logits.log_softmax(-1).gather(-1, torch.tensor(thought, device=ids.device)[:, None])[:, 0]
    return logp_z, logits[-1].log_softmax(-1)[yes_id]         # p(Yes): full-vocabulary softmax, raw logits


def score_all(model, prompts, thoughts, yes_id, eot_id, temperature=TEMPERATURE):
    """prompts[b][r] = (prefix, suffix), thoughts[b][r][k] = ids (r = 0 chosen, 1 rejected) →
    (logp_z[b][r][k] tensors, logp_yes (B, 2, K))."""
    logp_z, logp_yes = [], []
    for pair_prompts, pair_thoughts in zip(prompts, thoughts, strict=True):
        per = [[score(model, pre, z, suf, yes_id, eot_id, temperature) for z in zs]
               for (pre, suf), zs in zip(pair_prompts, pair_thoughts, strict=True)]
        logp_z.append([[lz for lz, _ in side] for side in per])
        logp_yes.append(torch.stack([torch.stack([ly for _, ly in side]) for side in per]))
    return logp_z, torch.stack(logp_yes)


# ---- §4 the estimator's weights, from the rollout's log p(Yes) (all stop-gradient)
def rollout_weights(old_logp_yes, eps=ADV_EPS):
    """(B, 2, K) log p_k → ω̂ (B,), p̄ (B, 2, K), thought advantages Â (B, 2, K)."""
    lp = old_logp_yes.detach()
    pbar = lp.softmax(-1)                                     # p̄_k = p_k / Σ_j p_j
    log_s = lp.logsumexp(-1)                                  # log ŝ + log K, per response
    omega = torch.sigmoid(log_s[:, 1] - log_s[:, 0])          # ω̂ = ŝ_l / (ŝ_w + ŝ_l)
    r = torch.stack((pbar[:, 0], -pbar[:, 1]), 1)             # "grpo" rewards: r^w = p̄^w, r^l = −p̄^l
    std = r.std(-1, correction=0, keepdim=True)               # population std within each group of K
    adv = omega[:, None, None] * (r - r.mean(-1, keepdim=True)) / (std + eps)
    return omega, pbar, adv


# ---- §5.3 the surrogate: L = L_score + L_thought (β = 0: no KL), mean over the pairs
def btpo_loss(new, old, eps_low=CLIP_EPS_LOW, eps_high=CLIP_EPS_HIGH):
    """``new``/``old`` = score_all(...) with and without grad. Returns (loss, diagnostics)."""
    (logp_z, logp_yes), (old_z, old_yes) = new, old
    omega, pbar, adv = rollout_weights(old_yes)
    b, _, k = logp_yes.shape
    # L_score = −ω̂ [Σ_k p̄^w_k log p(Yes|z^w_k) − Σ_k p̄^l_k log p(Yes|z^l_k)]
    l_score = -omega * ((pbar[:, 0] * logp_yes[:, 0]).sum(-1) - (pbar[:, 1] * logp_yes[:, 1]).sum(-1))
    # L_thought = −Σ_r (1/K) Σ_k mean_t min(ρ_t Â, clip(ρ_t, 1−ε_low, 1+ε_high) Â)
    #   ρ_t = π_θ(z_t | ·) / π_old(z_t | ·); mean_t over each thought's own tokens ("token-mean")
    l_thought, clipped, n_tok = [], 0, 0
    for i in range(b):
        total = 0.0
        for r in range(2):
            for j in range(k):
                a, ratio = adv[i, r, j], (logp_z[i][r][j] - old_z[i][r][j].detach()).exp()
                per_token = -torch.minimum(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
                total = total + per_token.mean() / k          # token-mean per thought, then 1/K
                clipped += int((((ratio > 1 + eps_high) & (a > 0)) | ((ratio < 1 - eps_low) & (a < 0))).sum())
                n_tok += len(ratio)
        l_thought.append(total)
    l_thought = torch.stack(l_thought)
    loss = (l_score + l_thought).mean()
    s = old_yes.detach().exp().mean(-1)                       # ŝ_w, ŝ_l (B, 2)
    diag = {"loss": loss.item(), "loss_score": l_score.mean().item(), "loss_thought": l_thought.mean().item(),
            "bt_nll_est": -(1 - omega).log().mean().item(),   # −log P̂(y_w ≻ y_l) = −log(1 − ω̂)
            "omega_mean": omega.mean().item(), "score_chosen": s[:, 0].mean().item(),
            "score_rejected": s[:, 1].mean().item(), "ess_mean": (1 / (pbar ** 2).sum(-1)).mean().item(),
            "clip_fraction": clipped / max(n_tok, 1)}
    return loss, diag


# ---- one whole step: sample → old scores → loss with grad → optimizer step
def btpo_step(model, tok, pairs, opt, k=K, max_thought_tokens=1000, temperature=TEMPERATURE,
              max_grad_norm=1.0):
    """pairs: dicts with "prompt" (chat messages), "chosen", "rejected" (strings) and "aspect"."""
    yes_id, eot_id = special_ids(tok)
    prompts = [[gpm_prompt(tok, p["prompt"], p[side], p["aspect"]) for side in ("chosen", "rejected")]
               for p in pairs]
    model.eval()
    thoughts = [[sample_thoughts(model, pre, k, eot_id, max_thought_tokens, temperature) for pre, _ in pp]
                for pp in prompts]
    with torch.no_grad():                                     # §5.2 the "old" policy's numbers
        old = score_all(model, prompts, thoughts, yes_id, eot_id, temperature)
    model.train()                   # §5.3 (the first minibatch of a rollout has ρ = 1: nothing clipped yet)
    loss, diag = btpo_loss(score_all(model, prompts, thoughts, yes_id, eot_id, temperature), old)
    opt.zero_grad()
    loss.backward()
    diag["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))
    opt.step()
    diag["thought_len"] = sum(len(z) for pt in thoughts for zs in pt for z in zs) / (2 * k * len(pairs))
    return loss, diag


PAIRS = [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "aspect": "correct",
          "chosen": f"{a} + {b} = {a + b}.", "rejected": f"{a} + {b} = {a + b + 1}."}
         for a, b in ((2, 3), (4, 1), (7, 5))]

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="folder or Hub id of a causal LM with a chat template "
                                    "(default: btpo_cli's tiny-qwen2)")
    ap.add_argument("--k", type=int, default=K)
    ap.add_argument("--max-thought-tokens", type=int, default=64, help="the library's default is 1000")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.model is None:      # convenience only (the algorithm above does not use btpo_cli)
        from btpo_cli.models.tiny import ensure_tiny
        args.model = str(ensure_tiny("tiny-qwen2"))
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    _, diag = btpo_step(model, tok, PAIRS, opt, k=args.k, max_thought_tokens=args.max_thought_tokens)
    for key, value in diag.items():
        print(f"{key:>15} {value:.6g}")
