"""``tiny-thinker``: a tiny base GPM that can think a little, pre-trained from scratch on CPU.

No machine here has pretrained weights, so the built-in benchmark needs a base model that plays
the part of an instruct model before preference training: it writes thoughts in the dialog
format of METHOD.md §2, some of them useful, and its Yes/No judgment is weak.

It is a Qwen2-architecture model (3 layers, 96 wide, ~0.45M parameters) with the tiny-qwen2
tokenizer (digits are single tokens), trained by next-token prediction on GPM dialogs about the
synthetic arithmetic task (``data_builders/synthetic.py``). The loss covers the two assistant
turns the GPM writes: the thought (turn 4) and the Yes/No answer (turn 6). The thoughts are a
mix (``ThinkerSpec``):

- careful (default 30%): "Let me check.", every step written out, the result, the response's
  claim minus the result, and whether the claim is right or wrong;
- lazy (55%): computes nothing ("Looks reasonable."); all lazy thoughts open with the same word,
  so greedy decoding picks a lazy thought;
- wrong (15%): careful-looking, with one arithmetic slip, and a verdict that follows the slip.

The answer after a careful or wrong thought agrees with that thought's verdict with probability
``answer_fidelity`` (default 0.7); after a lazy thought it is a coin flip. So the base model
samples useful thoughts sometimes, greedy-decodes a lazy one, and reads thoughts only weakly:
preference training has both things to learn — which thoughts to write and how to read them.
Half of the responses are right, half near misses.

Cached under ``$BTPO_CACHE/models/tiny-thinker-v<VERSION>-s<seed>``; built atomically.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

VERSION = 5


@dataclass(frozen=True)
class ThinkerSpec:
    seed: int = 0
    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-3
    hidden: int = 96
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    n_sequences: int = 12000
    """Distinct pre-training dialogs (generated once, then cycled)."""
    careful: float = 0.3
    lazy: float = 0.55
    wrong: float = 0.15
    answer_fidelity: float = 0.7
    digits: int = 1
    ops: int = 3


def thinker_dir(spec: ThinkerSpec, cache_root: Path | None = None) -> Path:
    from btpo_cli.tiny import tiny_cache_root

    root = cache_root or tiny_cache_root()
    return root / "models" / f"tiny-thinker-v{VERSION}-s{spec.seed}"


def pretraining_example(rng: random.Random, tok: object, spec: ThinkerSpec, ids: dict[str, int]) -> tuple[list[int], list[int]]:
    """One GPM dialog → (token ids, loss mask over thought and answer tokens)."""
    from btpo_cli.templates import encode_gpm, encode_text
    from data_builders.synthetic import (
        ASPECT,
        TaskSpec,
        careful_thought,
        lazy_thought,
        make_expression,
        near_miss,
        prompt_messages,
        response_text,
        wrong_thought,
    )

    expr = make_expression(rng, TaskSpec(digits=spec.digits, ops=spec.ops))
    claimed = expr.value if rng.random() < 0.5 else near_miss(rng, expr.value, 10 ** spec.digits - 1)
    kind = rng.choices(["careful", "lazy", "wrong"], [spec.careful, spec.lazy, spec.wrong])[0]
    if kind == "careful":
        thought, verdict = careful_thought(expr, claimed), claimed == expr.value
    elif kind == "wrong":
        thought = wrong_thought(rng, expr, claimed)
        verdict = thought.endswith("right.")
    else:
        thought, verdict = lazy_thought(rng), rng.random() < 0.5
    if kind != "lazy" and rng.random() > spec.answer_fidelity:
        verdict = not verdict
    g = encode_gpm(tok, prompt_messages(expr), response_text(expr, claimed), ASPECT, 10_000)
    z = encode_text(tok, thought) + [ids["eot"]]
    tail = g.suffix[1:]
    answer = [ids["yes"] if verdict else ids["no"], ids["eot"]]
    seq = g.prefix + z + tail + answer
    mask = [0] * len(g.prefix) + [1] * len(z) + [0] * len(tail) + [1] * len(answer)
    return seq, mask


def build_thinker(out_dir: Path, spec: ThinkerSpec, progress: Callable[[int, int, float], None] | None = None) -> dict:
    """Pre-train and save the model + tokenizer into ``out_dir``; return a summary."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from btpo_cli.models import load_tokenizer
    from btpo_cli.templates import answer_token_id, end_of_turn_id

    tok = load_tokenizer("tiny-qwen2")
    ids = {"yes": answer_token_id(tok, "Yes"), "no": answer_token_id(tok, "No"), "eot": end_of_turn_id(tok)}
    rng = random.Random(f"thinker:{spec.seed}")
    data = [pretraining_example(rng, tok, spec, ids) for _ in range(spec.n_sequences)]
    vocab = math.ceil(len(tok) / 64) * 64
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        cfg = Qwen2Config(vocab_size=vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                          num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                          num_key_value_heads=spec.kv_heads, max_position_embeddings=1024,
                          tie_word_embeddings=True, rope_theta=10000.0, pad_token_id=tok.pad_token_id,
                          bos_token_id=tok.pad_token_id, eos_token_id=ids["eot"])
        model = Qwen2ForCausalLM(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: min(1.0, (i + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(1.0, i / spec.steps))))
        g = torch.Generator().manual_seed(spec.seed)
        order: list[int] = []
        losses = []
        model.train()
        for step in range(spec.steps):
            if len(order) < spec.batch_size:
                order += torch.randperm(len(data), generator=g).tolist()
            batch, order = [data[i] for i in order[:spec.batch_size]], order[spec.batch_size:]
            t = max(len(s) for s, _ in batch)
            x = torch.full((len(batch), t), tok.pad_token_id)
            m = torch.zeros((len(batch), t))
            att = torch.zeros((len(batch), t), dtype=torch.long)
            for i, (s, mk) in enumerate(batch):
                x[i, :len(s)] = torch.tensor(s)
                m[i, :len(s)] = torch.tensor(mk, dtype=torch.float)
                att[i, :len(s)] = 1
            # the LM head only where the loss is (thought and answer tokens): the vocabulary
            # projection dominates the compute of a model this small
            hidden = model.model(input_ids=x, attention_mask=att).last_hidden_state[:, :-1]   # (b, t-1, h)
            keep = m[:, 1:].bool()
            logits = model.lm_head(hidden[keep]).float()                                     # (n, V)
            loss = torch.nn.functional.cross_entropy(logits, x[:, 1:][keep])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if progress:
                progress(step + 1, spec.steps, loss.item())
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = [ids["eot"]]
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    summary = {"name": "tiny-thinker", "version": VERSION, "spec": asdict(spec),
               "parameters": sum(p.numel() for p in model.parameters()),
               "final_loss": sum(losses[-50:]) / len(losses[-50:])}
    (out_dir / "btpo_thinker.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def ensure_thinker(spec: ThinkerSpec | None = None, cache_root: Path | None = None, force: bool = False) -> Path:
    """The cached base model folder, pre-training it first if needed (with a progress bar)."""
    import fcntl

    spec = spec or ThinkerSpec()
    target = thinker_dir(spec, cache_root)
    if (target / "btpo_thinker.json").exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".thinker.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "btpo_thinker.json").exists() and not force:
            return target
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-thinker-", dir=target.parent))
        try:
            _build_with_progress(tmp, spec)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build_with_progress(out: Path, spec: ThinkerSpec) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from btpo_cli.console import console

    with Progress(TextColumn("[bold]pre-training tiny-thinker"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                  console=console) as bar:
        task = bar.add_task("", total=spec.steps, info="")
        build_thinker(out, spec, lambda s, n, loss: bar.update(task, completed=s, info=f"loss {loss:.3f}"))
