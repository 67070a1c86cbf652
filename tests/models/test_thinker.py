"""tiny-thinker: a reproducible build, its metadata, and the comparison with the README's reference.

The full pre-training takes minutes; these tests build a few-step thinker (same code path, tiny
``steps`` and ``n_sequences``) so that bitwise reproducibility can be checked in seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from btpo_cli.models.thinker import (
    VERSION,
    ThinkerSpec,
    build_determinism,
    build_thinker,
    init_weights,
    load_reference,
    reference_check,
)
from tests.conftest import REPO

SMALL = ThinkerSpec(steps=6, n_sequences=96, batch_size=8)

BUILD = """
import json, sys, torch
from pathlib import Path
from btpo_cli.models.thinker import ThinkerSpec, build_thinker
torch.set_num_threads(int(sys.argv[2]))
s = build_thinker(Path(sys.argv[1]), ThinkerSpec(steps=6, n_sequences=96, batch_size=8))
print(json.dumps({"w": s["weights_sha256"], "t": s["tokenizer_sha256"], "loss": s["final_loss"]}))
"""


def _build_in_subprocess(out: Path, threads: int) -> dict:
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    import os

    p = subprocess.run([sys.executable, "-c", BUILD, str(out), str(threads)], capture_output=True, text=True,
                       env={**os.environ, **env}, cwd=REPO, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_head_dim_is_one_vllm_cpu_attention_supports() -> None:
    spec = ThinkerSpec()
    assert spec.hidden % spec.heads == 0 and spec.heads % spec.kv_heads == 0
    assert spec.hidden // spec.heads in {32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512}


def test_build_is_bitwise_identical_across_thread_counts(tmp_path: Path) -> None:
    """Two fresh interpreters with 1 and 2 intra-op threads (OMP/MKL env and torch) → the same bytes."""
    a = _build_in_subprocess(tmp_path / "a", 1)
    b = _build_in_subprocess(tmp_path / "b", 2)
    assert a == b
    info = json.loads((tmp_path / "a" / "btpo_thinker.json").read_text())
    assert info["version"] == VERSION and info["weights_sha256"] == a["w"]
    assert info["built_with"]["build_threads"] == 1
    for key in ("torch", "transformers", "tokenizers", "cpu_capability", "blas", "machine"):
        assert info["built_with"][key], key
    assert set(info["files_sha256"]) >= {"model.safetensors", "tokenizer.json"}


def test_different_seeds_give_different_thinkers(tmp_path: Path) -> None:
    a = build_thinker(tmp_path / "a", SMALL)
    b = build_thinker(tmp_path / "b", replace(SMALL, seed=1))
    assert a["weights_sha256"] != b["weights_sha256"]
    assert a["tokenizer_sha256"] == b["tokenizer_sha256"]


def test_build_determinism_restores_threads_and_flags() -> None:
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    with build_determinism(1):
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before


def test_init_weights_is_seeded_and_shaped() -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1, tie_word_embeddings=True)
    m1, m2, m3 = (Qwen2ForCausalLM(cfg) for _ in range(3))
    init_weights(m1, 0, 0.02)
    init_weights(m2, 0, 0.02)
    init_weights(m3, 1, 0.02)
    p1, p2, p3 = (dict(m.named_parameters()) for m in (m1, m2, m3))
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    emb = p1["model.embed_tokens.weight"]
    assert not torch.equal(emb, p3["model.embed_tokens.weight"])
    assert 0.015 < float(emb.detach().std()) < 0.025 and abs(float(emb.detach().mean())) < 0.005
    assert torch.equal(p1["model.norm.weight"], torch.ones(32))
    assert torch.equal(p1["model.layers.0.self_attn.q_proj.bias"], torch.zeros(32))
    assert m1.lm_head.weight.data_ptr() == emb.data_ptr()      # still tied


def _info(w: str, t: str = "tok", seed: int = 0, **env: str) -> dict:
    return {"version": VERSION, "spec": {"seed": seed}, "weights_sha256": w, "tokenizer_sha256": t,
            "final_loss": 0.1, "built_with": {"torch": "2.13.0", "transformers": "5.24.0", **env}}


REF = {"version": VERSION, "built_with": {"torch": "2.13.0", "transformers": "5.20.0", "cpu_capability": "AVX512"},
       "seeds": {"0": {"weights_sha256": "aaaa", "tokenizer_sha256": "tok", "final_loss": 0.1}}}


def test_reference_check_identical_different_and_missing() -> None:
    same = reference_check(_info("aaaa", cpu_capability="AVX512"), REF)
    assert same.status == "identical" and "bitwise identical" in same.lines[-1]
    other = reference_check(_info("bbbb", cpu_capability="AVX2"), REF)
    assert other.status == "different"
    text = "\n".join(other.lines)
    assert "transformers 5.20.0 → 5.24.0" in text and "cpu_capability AVX512 → AVX2" in text
    assert "weights differ" in text
    assert reference_check(_info("aaaa", seed=7), REF).status == "no-reference"
    assert reference_check(_info("aaaa"), {**REF, "version": VERSION - 1}).status == "no-reference"


def test_reference_check_names_another_cpu_model_only_where_the_reference_records_its_flags() -> None:
    old = reference_check(_info("bbbb", transformers="5.20.0", cpu_capability="AVX512", cpu_flags="1234"), REF)
    assert "the reference does not record its CPU flags" in "\n".join(old.lines)
    ref = {**REF, "built_with": {**REF["built_with"], "transformers": "5.24.0", "cpu_flags": "abcd"}}
    new = reference_check(_info("bbbb", cpu_capability="AVX512", cpu_flags="1234"), ref)
    assert "cpu_flags abcd → 1234 (another CPU model)" in "\n".join(new.lines)


def test_shipped_reference_is_for_this_version() -> None:
    ref = load_reference()
    assert ref["version"] == VERSION
    assert {"0", "1"} <= set(ref["seeds"])      # the thinker seeds the README's demo table was made with
    for r in ref["seeds"].values():
        assert len(r["weights_sha256"]) == 64 and len(r["tokenizer_sha256"]) == 64
    for key in ("torch", "transformers", "tokenizers", "cpu_capability", "blas"):
        assert ref["built_with"][key], key


@pytest.mark.parametrize("name", ["tiny-thinker-s1", "tiny-thinker-s12"])
def test_seeded_alias_resolves_to_its_own_folder(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import btpo_cli.models.thinker as thinker
    from btpo_cli.models.aliases import resolve_model

    seen: list[int] = []
    monkeypatch.setattr(thinker, "ensure_thinker", lambda spec=None, **_: seen.append(spec.seed) or tmp_path)
    assert resolve_model(name) == str(tmp_path)
    assert seen == [int(name.rsplit("-s", 1)[1])]


def test_a_non_default_recipe_gets_its_own_cache_folder(tmp_path: Path) -> None:
    from btpo_cli.models.thinker import thinker_dir

    default = thinker_dir(ThinkerSpec(seed=1), tmp_path)
    assert default.name == f"tiny-thinker-v{VERSION}-s1"
    other = thinker_dir(replace(ThinkerSpec(seed=1), steps=1200), tmp_path)
    assert other.name.startswith(default.name + "-") and other != default
    assert thinker_dir(replace(ThinkerSpec(seed=1), steps=1200), tmp_path) == other
