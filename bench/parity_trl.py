"""Parity check: btpo's ``bt`` method against TRL's ``RewardTrainer`` on the same model, data and settings.

Both sides start from the same weights (one seeded ``AutoModelForSequenceClassification`` with a
one-label head, saved once and loaded by both), read the same synthetic pairs in the same order,
see the same token ids, and use the same optimizer (AdamW, same lr / betas / eps / weight decay
and the same decay/no-decay split), constant schedule without warmup, gradient clipping, global
batch and micro-batch (gradient accumulation) sizes, fp32 on CPU. The script prints both
per-step loss curves side by side, the max abs difference per step and over a smoothing window,
and the final losses.

TRL is NOT a project dependency. Install it into a separate folder and point ``--trl-site`` at it::

    pip install --no-deps --target /tmp/trl_site trl==1.16.0
    python bench/parity_trl.py --trl-site /tmp/trl_site

How each difference between the two trainers is neutralised:

- data order: btpo's ``BatchPlan`` (seeded per-epoch permutation) decides the batches; the TRL
  dataset is written in exactly that order and read with ``train_sampling_strategy="sequential"``;
- token ids: TRL tokenizes the conversational ``prompt``/``chosen``/``rejected`` with the chat
  template; the script compares its ids with btpo's ``encode_response`` ids pair by pair and, if
  any differ, hands TRL btpo's ids pre-tokenized (``chosen_ids``/``rejected_ids``) and says so;
- initial head: loaded from the shared init folder, not re-drawn by each side;
- dropout: TRL's ``disable_dropout`` (tiny-qwen2 has none anyway); bf16 off, ``optim="adamw_torch"``;
- gradient accumulation: the Trainer divides each micro-batch mean by the accumulation steps,
  btpo weights each micro-batch by its share of the global batch: equal when micro-batches are equal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trl-site", default="/tmp/trl_site", help="folder TRL was installed into (pip --target)")
    p.add_argument("--model", default="tiny-qwen2")
    p.add_argument("--n-train", type=int, default=512)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.999)
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=int, default=5, help="smoothing window (steps) for the second comparison")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    p.add_argument("--json", default=None, help="also write the curves and figures here")
    p.add_argument("--workdir", default=None, help="keep the run folders here (default: a temporary folder)")
    return p.parse_args(argv)


def btpo_side(cfg: Any, work: Path) -> list[float]:
    from btpo_cli.methods import get_method
    from btpo_cli.runs.folder import Run

    run = Run(work / "run_btpo")
    run.check_new(resume=False, overwrite=True)
    run.write_start(cfg, 1)
    get_method("bt").train(cfg, run, resume=False)
    rows = [r for r in run.read_metrics() if "train/loss" in r]
    return [float(r["train/loss"]) for r in sorted(rows, key=lambda r: r["step"])]


def trl_side(args: argparse.Namespace, cfg: Any, init_dir: Path, work: Path, order: list[int], pairs: list[Any],
             records: list[Any]) -> tuple[list[float], dict[str, Any]]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from btpo_cli.models.loading import load_tokenizer
    from btpo_cli.training.steps import make_optimizer

    tok = load_tokenizer(str(init_dir))
    rows = [{"prompt": records[pairs[i].index].prompt, "chosen": records[pairs[i].index].chosen,
             "rejected": records[pairs[i].index].rejected} for i in order]
    ga = args.batch_size // args.micro_batch_size
    targs = RewardConfig(
        output_dir=str(work / "run_trl"), per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=ga, max_steps=args.steps, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=args.weight_decay, adam_beta1=args.beta1,
        adam_beta2=args.beta2, adam_epsilon=args.eps, max_grad_norm=args.max_grad_norm, optim="adamw_torch",
        seed=args.seed, data_seed=args.seed, train_sampling_strategy="sequential", logging_steps=1,
        save_strategy="no", report_to="none", bf16=False, fp16=False, use_cpu=True, max_length=args.max_length,
        disable_dropout=True, dataloader_drop_last=True, dataset_num_proc=None,
    )

    step_losses: list[float] = []
    micro: list[float] = []

    class Recorder(RewardTrainer):  # type: ignore[misc]
        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            if model.training:
                loss = out[0] if isinstance(out, tuple) else out
                micro.append(float(loss.detach()))
                if len(micro) == ga:
                    step_losses.append(sum(micro) / ga)
                    micro.clear()
            return out

    def make(dataset: Any) -> Any:
        model = AutoModelForSequenceClassification.from_pretrained(str(init_dir), num_labels=1,
                                                                   dtype=torch.float32)
        model.config.pad_token_id = tok.pad_token_id
        return Recorder(model=model, args=targs, train_dataset=dataset, processing_class=tok)

    info: dict[str, Any] = {}
    trainer = make(Dataset.from_list(rows))
    trl_c, trl_r = trainer.train_dataset["chosen_ids"], trainer.train_dataset["rejected_ids"]
    ours_c = [pairs[i].chosen for i in order]
    ours_r = [pairs[i].rejected for i in order]
    diff = sum(a != b for a, b in zip(trl_c, ours_c, strict=True)) + sum(
        a != b for a, b in zip(trl_r, ours_r, strict=True))
    info["tokenization"] = {"sequences": 2 * len(order), "differ": diff}
    if diff:
        k = next(i for i in range(len(order)) if trl_c[i] != ours_c[i] or trl_r[i] != ours_r[i])
        a, b = (trl_c[k], ours_c[k]) if trl_c[k] != ours_c[k] else (trl_r[k], ours_r[k])
        info["tokenization"]["example"] = {"trl": tok.decode(a), "btpo": tok.decode(b)}
        print(f"TRL's chat-template ids differ from btpo's for {diff} of {2 * len(order)} sequences, e.g.\n"
              f"  TRL : {tok.decode(a)!r}\n  btpo: {tok.decode(b)!r}\n"
              "-> giving TRL btpo's token ids pre-tokenized (chosen_ids / rejected_ids)")
        trainer = make(Dataset.from_list([{"chosen_ids": c, "rejected_ids": r}
                                          for c, r in zip(ours_c, ours_r, strict=True)]))
        info["tokenization"]["used"] = "btpo ids, pre-tokenized"
    else:
        print(f"token ids: TRL's chat-template tokenization == btpo's encode_response for all "
              f"{2 * len(order)} sequences")
        info["tokenization"]["used"] = "TRL's own chat-template tokenization"

    # the same decay / no-decay split of the parameters as btpo's make_optimizer
    decay_trl = set(trainer.get_decay_parameter_names(trainer.model))
    ours = make_optimizer(trainer.model, cfg)
    ids_to_name = {id(p): n for n, p in trainer.model.named_parameters()}
    decay_ours = {ids_to_name[id(p)] for p in ours.param_groups[0]["params"]}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    info["decay_groups_equal"] = (decay_trl & trainable) == decay_ours
    print(f"weight-decay groups equal: {info['decay_groups_equal']} ({len(decay_ours)} decayed tensors)")

    trainer.train()
    return step_losses, info


def smooth(xs: list[float], w: int) -> list[float]:
    return [sum(xs[max(0, i - w + 1):i + 1]) / len(xs[max(0, i - w + 1):i + 1]) for i in range(len(xs))]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.batch_size % args.micro_batch_size:
        raise SystemExit("--batch-size must be a multiple of --micro-batch-size")
    if not (Path(args.trl_site) / "trl").is_dir():
        raise SystemExit(f"TRL not found in {args.trl_site}: pip install --no-deps --target {args.trl_site} trl==1.16.0")
    sys.path.insert(0, args.trl_site)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")   # both sides on CPU, fp32

    import torch
    import transformers
    import trl
    from transformers import set_seed

    from btpo_cli.config import Config, ModelConfig
    from btpo_cli.data.pairs import load_split
    from btpo_cli.methods.bt import encode_pairs
    from btpo_cli.models.loading import load_reward_model, load_tokenizer
    from btpo_cli.models.tiny import ensure_tiny
    from btpo_cli.training.steps import BatchPlan
    from data_builders.synthetic import build_synthetic

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__} "
          f"(from {args.trl_site})")
    tmp = tempfile.TemporaryDirectory(prefix="parity_trl_") if args.workdir is None else None
    work = Path(args.workdir or tmp.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)

    data = work / "synthetic"
    if not (data / "manifest.json").exists():
        build_synthetic(data, n_train=args.n_train, n_test=16, seed=args.seed)

    # one initial model (seeded head), saved once, loaded by both sides
    init_dir = work / "init"
    src = ensure_tiny(args.model) if args.model.startswith("tiny-") else args.model
    tok = load_tokenizer(str(src))
    set_seed(args.seed)
    init = load_reward_model(ModelConfig(name=str(src), dtype="float32"), tok.pad_token_id, "cpu")
    init.save_pretrained(init_dir)
    tok.save_pretrained(init_dir)
    del init

    cfg = Config(method="bt", out=str(work / "run_btpo"))
    cfg.model.name = str(init_dir)
    cfg.model.dtype = "float32"
    cfg.data.path = str(data)
    cfg.data.max_length = args.max_length
    o = cfg.optim
    o.lr, o.weight_decay, o.beta1, o.beta2, o.eps = args.lr, args.weight_decay, args.beta1, args.beta2, args.eps
    o.scheduler, o.warmup_ratio, o.max_grad_norm = "constant", 0.0, args.max_grad_norm
    t = cfg.train
    t.seed, t.max_steps, t.batch_size, t.micro_batch_size = args.seed, args.steps, args.batch_size, args.micro_batch_size
    t.save_every, t.keep_checkpoints, t.log_every, t.precision = 0, 1, 1, "fp32"

    records = load_split(cfg, cfg.data.train_split)
    pairs, _ = encode_pairs(load_tokenizer(str(init_dir)), records, cfg.data.max_length)
    plan = BatchPlan.from_config(len(pairs), cfg, 1)
    order = [i for s in range(1, args.steps + 1) for i in plan.global_batch(s)]

    print(f"\n== btpo bt: {args.steps} steps × {args.batch_size} pairs (micro {args.micro_batch_size}), "
          f"lr {args.lr}, constant, wd {args.weight_decay}, clip {args.max_grad_norm}, seed {args.seed}")
    ours = btpo_side(cfg, work)
    print("\n== TRL RewardTrainer, same settings")
    theirs, info = trl_side(args, cfg, init_dir, work, order, pairs, records)

    if len(ours) != len(theirs):
        print(f"step counts differ: btpo {len(ours)}, TRL {len(theirs)}")
        return 1
    diffs = [abs(a - b) for a, b in zip(ours, theirs, strict=True)]
    so, st = smooth(ours, args.window), smooth(theirs, args.window)
    sdiffs = [abs(a - b) for a, b in zip(so, st, strict=True)]
    print(f"\n{'step':>4}  {'btpo':>10}  {'trl':>10}  {'|diff|':>9}  "
          f"{'btpo~' + str(args.window):>10}  {'trl~' + str(args.window):>10}")
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        print(f"{i + 1:>4}  {a:>10.6f}  {b:>10.6f}  {diffs[i]:>9.2e}  {so[i]:>10.6f}  {st[i]:>10.6f}")
    res = {"steps": args.steps, "btpo": ours, "trl": theirs, "max_abs_diff": max(diffs),
           "max_abs_diff_smoothed": max(sdiffs), "window": args.window, "final_btpo": ours[-1],
           "final_trl": theirs[-1], "first_btpo": ours[0], "first_trl": theirs[0], **info,
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}}
    print(f"\nfirst loss: btpo {ours[0]:.6f}  trl {theirs[0]:.6f}")
    print(f"final loss: btpo {ours[-1]:.6f}  trl {theirs[-1]:.6f}")
    print(f"max |diff| per step: {max(diffs):.3e} (step {diffs.index(max(diffs)) + 1}); "
          f"smoothed over {args.window}: {max(sdiffs):.3e}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
