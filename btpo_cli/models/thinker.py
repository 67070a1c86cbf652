"""``tiny-thinker``: a tiny base GPM that can think a little, pre-trained from scratch on CPU.

No machine here has pretrained weights, so the built-in benchmark needs a base model that plays
the part of an instruct model before preference training: it writes thoughts in the dialog
format of METHOD.md §2, some of them useful, and its Yes/No judgment is weak.

It is a Qwen2-architecture model (3 layers, 96 wide, 3 heads of 32, ~0.48M parameters) with the tiny-qwen2
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

Reproducibility
---------------
The build is made as independent of the environment as it can be: the initial weights are drawn
by our own code from Python's ``random`` (not by transformers' ``_init_weights``, which changes
between versions, nor by torch's vectorized normal sampler), the data order is a Python shuffle,
attention is ``eager``, and the pre-training runs on ONE intra-op thread with torch's
deterministic algorithms on (:func:`build_determinism`), so that the thread count of the machine
(``OMP_NUM_THREADS``, ``torch.set_num_threads``) does not change a single bit. What can still
change the floats is the arithmetic itself: the BLAS (MKL, OpenBLAS, Accelerate) and the kernels it
picks for the CPU model, the CPU's vector instructions (``torch.backends.cpu.get_cpu_capability()``),
and the torch / transformers versions. The versions are locked (``requirements/venv.lock``) and the
kernels fixed (:mod:`btpo_cli.cpu_kernels`: a build in a process without them runs in a child with
them). ``btpo_thinker.json`` records the sha256 of the weights and tokenizer files and the library
versions, CPU capability, CPU flags, kernels and thread count of the build, and
:func:`reference_check` compares them with ``thinker_reference.json`` (the thinkers the README's
table was made with). Measured in docs/experiments.md (2026-11-29).

head_dim is 32 (96 wide, 3 heads): vLLM's CPU attention accepts only head sizes in
{32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512}; v5 had 4 heads of 24.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from btpo_cli import cpu_kernels
from btpo_cli.data.files import sha256_file
from btpo_cli.data.synthetic import (
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
from btpo_cli.errors import BtpoError
from btpo_cli.fsio import file_lock, publish_folder
from btpo_cli.judging.templates import answer_token_id, encode_gpm, encode_text, end_of_turn_id
from btpo_cli.models.inputs import with_pad_token
from btpo_cli.progress import PhaseProgress

VERSION = 7
"""v7: built with the fixed CPU kernels (:mod:`btpo_cli.cpu_kernels`); v6: 3 heads of 32 (v5: 4 of 24), own weight
init, single-thread deterministic build, hashes in the metadata."""

BUILD_THREADS = 1
"""Intra-op threads during pre-training: fixed, so that the machine's thread count cannot change the result."""

REFERENCE_FILE = Path(__file__).with_name("thinker_reference.json")
HASHED_FILES = ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json")
"""Files whose sha256 goes into ``btpo_thinker.json``; the first two identify a thinker."""


@dataclass(frozen=True)
class ThinkerSpec:
    seed: int = 0
    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-3
    hidden: int = 96
    layers: int = 3
    heads: int = 3
    """3 heads of 32: a head size vLLM's CPU attention supports."""
    kv_heads: int = 3
    intermediate: int = 256
    init_std: float = 0.02
    n_sequences: int = 12000
    """Distinct pre-training dialogs (generated once, then cycled)."""
    careful: float = 0.3
    lazy: float = 0.55
    wrong: float = 0.15
    answer_fidelity: float = 0.7
    digits: int = 1
    ops: int = 3


def thinker_dir(spec: ThinkerSpec, cache_root: Path | None = None) -> Path:
    from btpo_cli.models.tiny import tiny_cache_root  # heavy: imported on use

    root = cache_root or tiny_cache_root()
    name = f"tiny-thinker-v{VERSION}-s{spec.seed}"
    if spec != ThinkerSpec(seed=spec.seed):   # a non-default spec never takes the default's place
        name += "-" + hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:8]
    return root / "models" / name


def pretraining_example(rng: random.Random, tok: object, spec: ThinkerSpec, ids: dict[str, int]) -> tuple[list[int], list[int]]:
    """One GPM dialog → (token ids, loss mask over thought and answer tokens)."""
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


@contextlib.contextmanager
def build_determinism(threads: int = BUILD_THREADS) -> Iterator[None]:
    """Run the block on ``threads`` intra-op threads with deterministic algorithms; restore both after.

    One thread makes every reduction (matmul, sums, softmax) happen in one fixed order whatever
    the machine's core count or ``OMP_NUM_THREADS``; deterministic algorithms rule out the
    (CPU-rare) non-deterministic kernels.
    """
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)


def init_weights(model: torch.nn.Module, seed: int, std: float) -> None:
    """Initial weights from Python's ``random`` in parameter-name order, the same under any torch/transformers.

    Matrices (embeddings, projections) ~ N(0, std²) rounded to float32; norm weights 1; biases 0.
    Tied parameters are visited once (``named_parameters`` de-duplicates them).
    """
    rng = random.Random(f"thinker-init:{seed}")
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda x: x[0]):
            if p.dim() >= 2:
                vals = [rng.gauss(0.0, std) for _ in range(p.numel())]
                p.copy_(torch.tensor(vals, dtype=torch.float64).view(p.shape).to(p.dtype))
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.zero_()


def cpu_flags() -> str | None:
    """sha256 (16 hex) of the CPU's feature flags (``/proc/cpuinfo``), or None where unreadable.

    torch's CPU capability says AVX512 for every AVX-512 CPU; the BLAS picks its kernels (and so its
    summation order) by the finer features (e.g. avx512_fp16, avx512_bf16) and the cache sizes: two
    AVX512 machines built different seed-0 thinkers with the same locked versions (docs/environment.md)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return None
    line = next((x for x in text.splitlines() if x.startswith("flags")), None)
    if line is None:
        return None
    flags = " ".join(sorted(line.split(":", 1)[1].split()))
    return hashlib.sha256(flags.encode()).hexdigest()[:16]


def build_environment(threads: int = BUILD_THREADS) -> dict[str, Any]:
    """What the floats of a build can depend on: library versions, CPU capability and flags, BLAS, threads."""
    import tokenizers  # heavy: imported on use
    import transformers  # heavy: imported on use

    try:
        import accelerate  # heavy: imported on use

        acc_version = accelerate.__version__
    except ImportError:  # pragma: no cover - a dependency, but not needed to build
        acc_version = None
    cfg = torch.__config__.show()
    blas = "mkl" if "BLAS_INFO=mkl" in cfg else ("openblas" if "openblas" in cfg.lower() else "other")
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "accelerate": acc_version, "machine": platform.machine(), "system": platform.system(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_flags": cpu_flags(), "blas": blas,
            "build_threads": threads, "env_OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "kernels": cpu_kernels.described()}


def build_thinker(out_dir: Path, spec: ThinkerSpec, progress: Callable[[int, int, float], None] | None = None) -> dict:
    """Pre-train and save the model + tokenizer into ``out_dir``; return the summary (``btpo_thinker.json``)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM  # heavy: imported on use

    from btpo_cli.models.tiny import ensure_tiny  # heavy: imported on use

    t_start = time.perf_counter()
    tok = with_pad_token(AutoTokenizer.from_pretrained(str(ensure_tiny("tiny-qwen2"))))
    ids = {"yes": answer_token_id(tok, "Yes"), "no": answer_token_id(tok, "No"), "eot": end_of_turn_id(tok)}
    rng = random.Random(f"thinker:{spec.seed}")
    data = [pretraining_example(rng, tok, spec, ids) for _ in range(spec.n_sequences)]
    order_rng = random.Random(f"thinker-order:{spec.seed}")
    vocab = math.ceil(len(tok) / 64) * 64
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                      num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                      num_key_value_heads=spec.kv_heads, max_position_embeddings=1024,
                      tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.pad_token_id, eos_token_id=ids["eot"],
                      attn_implementation="eager", dtype="float32")
    with torch.random.fork_rng(devices=[]), build_determinism():
        torch.manual_seed(spec.seed)   # nothing below draws from it; kept so no global state leaks in
        model = Qwen2ForCausalLM(cfg).float()
        init_weights(model, spec.seed, spec.init_std)
        opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), weight_decay=0.01, foreach=False)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: min(1.0, (i + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(1.0, i / spec.steps))))
        order: list[int] = []
        losses = []
        model.train()
        for step in range(spec.steps):
            if len(order) < spec.batch_size:
                perm = list(range(len(data)))
                order_rng.shuffle(perm)
                order += perm
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
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=False)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if progress:
                progress(step + 1, spec.steps, loss.item())
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = [ids["eot"]]
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    files = {f: sha256_file(out_dir / f) for f in HASHED_FILES if (out_dir / f).is_file()}
    summary = {"name": "tiny-thinker", "version": VERSION, "spec": asdict(spec),
               "parameters": sum(p.numel() for p in model.parameters()),
               "final_loss": sum(losses[-50:]) / len(losses[-50:]),
               "weights_sha256": files.get("model.safetensors"), "tokenizer_sha256": files.get("tokenizer.json"),
               "files_sha256": files, "built_with": build_environment(),
               "build_seconds": round(time.perf_counter() - t_start, 1)}
    (out_dir / "btpo_thinker.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ----------------------------------------------------------------------------- the README's thinkers


@dataclass
class ReferenceCheck:
    """How a built thinker compares with the one the README's table was made with."""

    status: str
    """``identical`` (weights and tokenizer sha256 equal), ``different``, or ``no-reference`` (seed not recorded)."""
    lines: list[str]


def load_reference() -> dict[str, Any]:
    """``thinker_reference.json``: ``{"version", "built_with", "lock", "seeds": {seed: {weights_sha256, tokenizer_sha256, final_loss}}}``."""
    try:
        return json.loads(REFERENCE_FILE.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"version": None, "seeds": {}}


def reference_check(info: dict[str, Any], reference: dict[str, Any] | None = None) -> ReferenceCheck:
    """Compare a thinker's ``btpo_thinker.json`` with the reference; explain what differs."""
    ref = reference if reference is not None else load_reference()
    seed = str(info.get("spec", {}).get("seed"))
    env = info.get("built_with", {})
    short = (info.get("weights_sha256") or "?")[:12]
    lines = [f"tiny-thinker v{info.get('version')} seed {seed}: weights sha256 {short}…, tokenizer sha256 "
             f"{(info.get('tokenizer_sha256') or '?')[:12]}…, final pre-training loss {info.get('final_loss', float('nan')):.4f}",
             "  built with torch {torch}, transformers {transformers}, tokenizers {tokenizers}, accelerate {accelerate}, "
             "{machine} {cpu_capability} ({blas}), {build_threads} thread(s)".format(
                 **{k: env.get(k, "?") for k in ("torch", "transformers", "tokenizers", "accelerate", "machine",
                                                  "cpu_capability", "blas", "build_threads")})]
    r = ref.get("seeds", {}).get(seed) if ref.get("version") == info.get("version") else None
    if r is None:
        lines.append("  no reference recorded for this thinker: the README's numbers were made with other thinkers")
        return ReferenceCheck("no-reference", lines)
    same_w = r.get("weights_sha256") == info.get("weights_sha256")
    same_t = r.get("tokenizer_sha256") == info.get("tokenizer_sha256")
    if same_w and same_t:
        lines.append("  = the reference thinker the README's table was made with (bitwise identical)")
        return ReferenceCheck("identical", lines)
    renv = ref.get("built_with", {})
    diff = [f"{k} {renv.get(k)} → {env.get(k)}" for k in ("torch", "transformers", "tokenizers", "machine",
                                                          "cpu_capability", "blas", "kernels")
            if renv.get(k) != env.get(k)]
    if renv.get("cpu_flags") and renv.get("cpu_flags") != env.get("cpu_flags"):   # older references: not recorded
        diff.append(f"cpu_flags {renv['cpu_flags']} → {env.get('cpu_flags')} (another CPU model)")
    what = ("weights" if not same_w else "") + (" and " if not same_w and not same_t else "") + \
           ("tokenizer" if not same_t else "")
    lines.append(f"  ≠ the README's reference thinker ({what} differ: reference weights "
                 f"{(r.get('weights_sha256') or '?')[:12]}…, final loss {r.get('final_loss', float('nan')):.4f})")
    lines.append("  environment differences: " + (", ".join(diff) if diff else
                 "none recorded (same versions and CPU capability; a different BLAS build or CPU model"
                 + ("" if renv.get("cpu_flags") else ": the reference does not record its CPU flags") + ")"))
    lines.append("  expect the README's numbers within their stated spread over thinker seeds, not identical")
    return ReferenceCheck("different", lines)


def ensure_thinker(spec: ThinkerSpec | None = None, cache_root: Path | None = None, force: bool = False) -> Path:
    """The cached base model folder, pre-training it first if needed (with a progress bar)."""
    spec = spec or ThinkerSpec()
    target = thinker_dir(spec, cache_root)
    if (target / "btpo_thinker.json").exists() and not force:
        return target
    if not cpu_kernels.is_pinned() and cache_root is None and spec == ThinkerSpec(seed=spec.seed, steps=spec.steps):
        _build_in_pinned_child(spec, force)       # the same bits as the reference, whatever this process ran
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # one lock per thinker folder: different seeds build side by side, the same seed once
    with file_lock(target.parent / f".{target.name}.lock"):
        if (target / "btpo_thinker.json").exists() and not force:
            return target
        # built beside the target, then published: a kill at any point leaves the old folder or the new one
        publish_folder(target, lambda tmp: _build_with_progress(tmp, spec))
    return target


def _build_in_pinned_child(spec: ThinkerSpec, force: bool) -> None:
    """``btpo base-model`` in a child process with the fixed CPU kernels (:mod:`btpo_cli.cpu_kernels`): a
    process that already computed with the machine's own kernels cannot switch them."""
    cmd = [sys.executable, "-m", "btpo_cli", "base-model", "--seed", str(spec.seed), "--steps", str(spec.steps)]
    p = subprocess.run(cmd + (["--force"] if force else []), env=cpu_kernels.pinned_env(), stdout=subprocess.PIPE,
                       text=True, check=False)
    if p.returncode != 0:
        raise BtpoError(f"pre-training tiny-thinker seed {spec.seed} failed (exit {p.returncode}; its error is above)")


def _build_with_progress(out: Path, spec: ThinkerSpec) -> None:
    """Pre-train with a bar on a terminal, ``[btpo] pre-training tiny-thinker: step …`` lines in a log."""
    with PhaseProgress(spec.steps, "pre-training tiny-thinker") as bar:
        build_thinker(out, spec, lambda s, n, loss: bar.update(s, f"loss {loss:.3f}"))
