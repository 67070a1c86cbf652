"""Measure the peak memory of real training steps, to check ``btpo plan``'s estimates against.

A measurement is a real ``btpo train`` run (:func:`btpo_cli.training.launch.launch`: the method's own
set-up, loop, rollout engine and optimizer) of a *random-init* model with a given architecture,
on a generated data set whose prompts are long enough that every sequence is cut to exactly
``data.max_length`` tokens — so the run sees the planner's worst-case shapes. It runs in a fresh
child process (``python -m btpo_cli.plan.measure CONFIG OUT``) that

- on ``cpu`` (with ``MALLOC_MMAP_THRESHOLD_=65536``, so that freed tensors leave the RSS as
  they leave a CUDA allocator's *allocated* bytes): imports everything, loads the tokenizer and the data, reads its resident set size
  (``VmRSS`` in ``/proc/self/status``) as the *baseline*, trains, and reports ``VmHWM`` (the peak
  resident set size) minus that baseline, over the whole run and over the training steps alone
  (from the end of the session's build to the first checkpoint save: ``/proc/self/clear_refs``);
- on ``cuda``: reports ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` and the
  device memory in use outside the allocator (context, NCCL), from ``mem_get_info``.

``bench/plan_memory.py`` runs a table of these; ``tests/plan/test_plan.py`` runs one.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from btpo_cli.config import config_from_dict, validate
from btpo_cli.console import quiet_transformers
from btpo_cli.data.pairs import load_split, write_jsonl
from btpo_cli.fsio import atomic_write
from btpo_cli.judging.templates import encode_gpm
from btpo_cli.methods import get_method
from btpo_cli.models.aliases import resolve_model
from btpo_cli.runs.folder import Run

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu", "one", "two", "three", "four", "five", "six"]


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` field (``VmRSS``, ``VmHWM``) in KiB."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def build_random_model(folder: Path, config: dict[str, Any], seed: int = 0,
                       tokenizer_from: str = "tiny-qwen2") -> Path:
    """Save a random-init causal LM of ``config`` (a config.json mapping) with a tiny model's tokenizer."""
    import torch  # heavy: imported on use
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # heavy: imported on use

    quiet_transformers()
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    conf = dict(config)
    model_type = conf.pop("model_type", "qwen2")
    conf = {k: v for k, v in conf.items() if not k.startswith("_")}
    tok = AutoTokenizer.from_pretrained(resolve_model(tokenizer_from))
    hf_conf = AutoConfig.for_model(model_type, **conf)
    hf_conf.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_conf, dtype=torch.float32)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder


def write_long_pairs(folder: Path, n: int, prompt_words: int = 600, response_words: int = 40,
                     seed: int = 0) -> Path:
    """A data set whose prompts overflow any small ``data.max_length`` (so every sequence is cut to it)."""
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    rows = [{"id": f"long-{j}", "prompt": [{"role": "user", "content": text(prompt_words)}],
             "chosen": [{"role": "assistant", "content": text(response_words)}],
             "rejected": [{"role": "assistant", "content": text(response_words)}]} for j in range(n)]
    for split in ("train", "test"):
        write_jsonl(folder / f"{split}.jsonl", rows)
    return folder


def gpm_tail_tokens(model_dir: str, max_length: int) -> int:
    """Tokens of the GPM tail (rating question + answer head) with this tokenizer."""
    from btpo_cli.models.loading import load_tokenizer  # heavy: imported on use

    tok = load_tokenizer(model_dir, padding_side="left")
    prompt = [{"role": "user", "content": "hello"}]
    return len(encode_gpm(tok, prompt, "a response", "helpful and harmless", max_length).suffix)


WARMUP_CONFIG = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                     intermediate_size=128, vocab_size=2048, max_position_embeddings=4096)
"""The one-layer model the measured process trains first (same architecture type and tokenizer)."""


def measure(cfg_dict: dict[str, Any], workdir: Path, device: str = "cpu", timeout: float = 1800,
            warmup_model: Path | None = None) -> dict[str, Any]:
    """Run ``cfg_dict`` as a training run in a child process; return its memory report.

    With ``warmup_model`` (see :data:`WARMUP_CONFIG`) the child first runs the same config on it,
    so that the baseline includes the runtime's fixed costs."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path, out_path = workdir / "measure-config.yaml", workdir / "measure-result.json"
    data = dict(cfg_dict, _warmup_model=str(warmup_model)) if warmup_model else cfg_dict
    atomic_write(cfg_path, yaml.safe_dump(data, sort_keys=False))
    env = dict(os.environ)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        # a fixed mmap threshold: glibc then serves every block ≥ 64 KiB (any tensor that matters)
        # with its own mapping and unmaps it on free, so the RSS follows the live tensors as
        # torch.cuda.max_memory_allocated does on a GPU, instead of keeping freed activations in
        # its heap (the dynamic threshold rises to 32 MiB after the first large free)
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    proc = subprocess.run([sys.executable, "-m", "btpo_cli.plan.measure", str(cfg_path), str(out_path), device],
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out_path.exists():
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise RuntimeError(f"measurement run failed (exit {proc.returncode}): {tail}")
    return json.loads(out_path.read_text())


def _malloc_trim() -> None:
    """Give the C heap's free pages back to the system (glibc), so the baseline holds no free memory."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_hwm() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (``/proc/self/clear_refs`` value 5, Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


class _TrainWindow:
    """Peak RSS of the training steps alone: from the end of ``TrainSession.build`` (model, optimizer,
    reference loaded) to the first checkpoint save or ``finish`` (which serialize copies of the
    weights: not training memory, and not what the planner estimates).

    ``peak``/``built`` stay None where ``VmHWM`` cannot be reset; the whole-run peak is reported anyway."""

    def __init__(self) -> None:
        self.peak: int | None = None
        self.built: int = 0
        self._saved: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> _TrainWindow:
        from btpo_cli.training.session import TrainSession  # heavy: imported on use

        def after_build(orig: Any) -> Any:
            def wrapped(sess: Any, *a: Any, **k: Any) -> Any:
                r = orig(sess, *a, **k)
                gc.collect()
                self.built = status_kb("VmRSS") * 1024
                self._open = reset_hwm()
                return r
            return wrapped

        def before(orig: Any) -> Any:
            def wrapped(obj: Any, *a: Any, **k: Any) -> Any:
                if getattr(self, "_open", False) and self.peak is None:
                    self.peak = status_kb("VmHWM") * 1024
                return orig(obj, *a, **k)
            return wrapped

        for owner, name, wrap in ((TrainSession, "build", after_build), (TrainSession, "finish", before),
                                  (Run, "save_checkpoint", before)):
            orig = getattr(owner, name)
            self._saved.append((owner, name, orig))
            setattr(owner, name, wrap(orig))
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, name, orig in self._saved:
            setattr(owner, name, orig)


def _child(cfg_path: str, out_path: str, device: str) -> None:
    """The measured process: warm everything up, take the baseline, train, report."""
    import accelerate  # heavy: imported on use  # noqa: F401
    import torch  # heavy: imported on use
    import transformers  # heavy: imported on use  # noqa: F401

    from btpo_cli.models.loading import load_tokenizer  # heavy: imported on use
    from btpo_cli.training.launch import launch  # heavy: imported on use

    quiet_transformers()
    data = yaml.safe_load(Path(cfg_path).read_text())
    warm = data.pop("_warmup_model", None)
    cfg = config_from_dict(data, cfg_path)
    validate(cfg)
    get_method(cfg.method)
    load_tokenizer(cfg.model.name)
    load_split(cfg, cfg.data.train_split)
    if warm:
        # the same run on a one-layer model first: imports, kernels' code pages, thread pools and
        # allocator arenas are then part of the baseline, not of the measured peak
        wcfg = config_from_dict({**data, "model": {**data["model"], "name": warm},
                                 "out": str(Path(cfg.out).with_name(Path(cfg.out).name + "-warmup"))}, cfg_path)
        launch(wcfg, overwrite=True)
    gc.collect()
    _malloc_trim()

    cuda = device == "cuda"
    if cuda:
        torch.cuda.init()
        torch.zeros(1, device="cuda")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base_rss = status_kb("VmRSS") * 1024
    window = _TrainWindow()
    with window:
        launch(cfg, overwrite=True)
    report: dict[str, Any] = {"device": device, "baseline_rss": base_rss, "hwm": status_kb("VmHWM") * 1024}
    report["peak_rss_over_baseline"] = report["hwm"] - base_rss
    if window.peak is not None:
        report["train_peak_rss_over_baseline"] = window.peak - base_rss
        report["built_rss_over_baseline"] = window.built - base_rss
    if cuda:
        free, total = torch.cuda.mem_get_info()
        report.update(max_allocated=torch.cuda.max_memory_allocated(), max_reserved=torch.cuda.max_memory_reserved(),
                      outside_allocator=(total - free) - torch.cuda.memory_reserved(), total=total)
    atomic_write(Path(out_path), json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "cpu")
