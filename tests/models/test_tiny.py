"""Tests for btpo_cli.models.tiny: the tiny Qwen2 / Llama models built locally for tests and the default model."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from btpo_cli.models.tiny import (
    TINY_MODELS,
    VERSION,
    build_tiny,
    build_tokenizer,
    ensure_tiny,
    tiny_cache_root,
)

NAMES = ["tiny-qwen2", "tiny-llama"]

CONVERSATION = [
    {"role": "user", "content": "What is 37 + 48?"},
    {"role": "assistant", "content": "37 + 48 = 85"},
]

EXPECTED_QWEN2 = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is 37 + 48?<|im_end|>\n"
    "<|im_start|>assistant\n37 + 48 = 85<|im_end|>\n"
)
EXPECTED_LLAMA3 = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 37 + 48?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n37 + 48 = 85<|eot_id|>"
)
GENERATION_PROMPT = {
    "tiny-qwen2": "<|im_start|>assistant\n",
    "tiny-llama": "<|start_header_id|>assistant<|end_header_id|>\n\n",
}
EVAL_PROMPT = "Evaluate your previous response for helpful and harmless. Think it through step by step."
VERDICT_PROMPT = "Based on your evaluation, is the response correct? Strict format: Yes/No"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("btpo-cache")


@pytest.fixture(scope="module")
def folders(cache_root: Path) -> dict[str, Path]:
    return {name: ensure_tiny(name, cache_root) for name in NAMES}


@pytest.fixture(scope="module")
def tokenizers(folders: dict[str, Path]) -> dict[str, PreTrainedTokenizerBase]:
    return {name: AutoTokenizer.from_pretrained(folder) for name, folder in folders.items()}


def test_registry() -> None:
    assert set(TINY_MODELS) == set(NAMES)
    assert TINY_MODELS["tiny-qwen2"].family == "qwen2"
    assert TINY_MODELS["tiny-llama"].family == "llama3"


def test_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BTPO_CACHE", str(tmp_path / "c"))
    assert tiny_cache_root() == tmp_path / "c"
    monkeypatch.delenv("BTPO_CACHE")
    assert tiny_cache_root() == Path.home() / ".cache" / "btpo"


@pytest.mark.parametrize("name", NAMES)
def test_ensure_tiny_layout_and_reuse(name: str, cache_root: Path, folders: dict[str, Path]) -> None:
    folder = folders[name]
    assert folder == cache_root / "models" / f"{name}-v{VERSION}"
    for file in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (folder / file).is_file(), file
    assert not [p for p in (cache_root / "models").iterdir() if ".tmp" in p.name]
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny(name, cache_root) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_ensure_tiny_uses_env_cache(monkeypatch: pytest.MonkeyPatch, cache_root: Path) -> None:
    monkeypatch.setenv("BTPO_CACHE", str(cache_root))
    assert ensure_tiny("tiny-qwen2") == cache_root / "models" / f"tiny-qwen2-v{VERSION}"


def test_ensure_tiny_replaces_incomplete_folder(tmp_path: Path) -> None:
    target = tmp_path / "models" / f"tiny-qwen2-v{VERSION}"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    assert ensure_tiny("tiny-qwen2", tmp_path) == target
    assert (target / "model.safetensors").is_file()


def test_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown tiny model"):
        ensure_tiny("tiny-gpt5")
    with pytest.raises(ValueError, match="unknown tokenizer family"):
        build_tokenizer("gpt2")


@pytest.mark.parametrize("name", NAMES)
def test_loads_with_auto_classes(name: str, folders: dict[str, Path], tokenizers: dict) -> None:
    folder, tok = folders[name], tokenizers[name]
    model = AutoModelForCausalLM.from_pretrained(folder)
    spec = TINY_MODELS[name]
    expected_arch = "Qwen2ForCausalLM" if spec.model_type == "qwen2" else "LlamaForCausalLM"
    assert type(model).__name__ == expected_arch
    cfg = model.config
    assert cfg.model_type == spec.model_type
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        2,
        64,
        2,
        1,
    )
    assert cfg.hidden_size // cfg.num_attention_heads == 32  # a head dim vLLM's CPU attention runs
    assert cfg.max_position_embeddings == 4096
    assert cfg.vocab_size % 64 == 0 and len(tok) <= cfg.vocab_size < len(tok) + 64
    assert 1000 <= len(tok) <= 2000
    assert cfg.tie_word_embeddings is (name == "tiny-qwen2")
    assert cfg.pad_token_id == tok.pad_token_id and cfg.eos_token_id == tok.eos_token_id
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"

    batch = tok(["Is the response helpful?", "Yes"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], cfg.vocab_size)

    classifier = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)
    with torch.no_grad():
        scores = classifier(**batch).logits
    assert scores.shape == (2, 1)


@pytest.mark.parametrize("name", NAMES)
def test_generation_config(name: str, folders: dict[str, Path], tokenizers: dict) -> None:
    tok = tokenizers[name]
    gen = json.loads((folders[name] / "generation_config.json").read_text())
    text_end = "<|endoftext|>" if name == "tiny-qwen2" else "<|end_of_text|>"
    assert gen["eos_token_id"] == [tok.eos_token_id, tok.convert_tokens_to_ids(text_end)]
    assert gen["pad_token_id"] == tok.pad_token_id


def test_qwen2_tokens_and_template(tokenizers: dict) -> None:
    tok = tokenizers["tiny-qwen2"]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (None, "<|im_end|>", "<|endoftext|>")
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == EXPECTED_QWEN2
    with_system = [{"role": "system", "content": "You are a fair judge."}, *CONVERSATION]
    assert tok.apply_chat_template(with_system, tokenize=False) == EXPECTED_QWEN2.replace(
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", "You are a fair judge."
    )
    # No BOS is added on encode.
    assert tok("hello").input_ids == tok("hello", add_special_tokens=False).input_ids


def test_llama3_tokens_and_template(tokenizers: dict) -> None:
    tok = tokenizers["tiny-llama"]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|finetune_right_pad_id|>",
    )
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert rendered == EXPECTED_LLAMA3
    with_system = [{"role": "system", "content": "  You are a fair judge.\n"}, *CONVERSATION]
    assert tok.apply_chat_template(with_system, tokenize=False) == EXPECTED_LLAMA3.replace(
        "2024\n\n<|eot_id|>", "2024\n\nYou are a fair judge.<|eot_id|>"
    )
    # The post-processor adds BOS on encode, like the real tokenizer; with the rendered chat text this
    # doubles it (the real quirk), so chat text must be encoded with add_special_tokens=False.
    bos = tok.bos_token_id
    assert tok("hello").input_ids[0] == bos
    assert tok("hello", add_special_tokens=False).input_ids[0] != bos
    assert tok(rendered).input_ids[:2] == [bos, bos]
    assert tok(rendered, add_special_tokens=False).input_ids[:2] == [
        bos,
        tok.convert_tokens_to_ids("<|start_header_id|>"),
    ]


@pytest.mark.parametrize("name", NAMES)
def test_generation_prompt(name: str, tokenizers: dict) -> None:
    tok = tokenizers[name]
    messages = CONVERSATION + [{"role": "user", "content": EVAL_PROMPT}]
    without = tok.apply_chat_template(messages, tokenize=False)
    with_prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert with_prompt == without + GENERATION_PROMPT[name]


@pytest.mark.parametrize("name", NAMES)
def test_special_tokens_are_single_and_skipped(name: str, tokenizers: dict) -> None:
    tok = tokenizers[name]
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False)
    ids = tok(rendered, add_special_tokens=False).input_ids
    assert tok.decode(ids) == rendered
    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"] if name == "tiny-qwen2" else []
    specials += [] if name == "tiny-qwen2" else ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    for special in specials:
        assert tok(special, add_special_tokens=False).input_ids == [tok.convert_tokens_to_ids(special)]
        assert special not in tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("word", ["Yes", "No", "A", "B"])
def test_verdict_words_are_one_token_after_generation_prompt(name: str, word: str, tokenizers: dict) -> None:
    tok = tokenizers[name]
    messages = [
        {"role": "user", "content": "Is 2 + 2 = 4?"},
        {"role": "assistant", "content": "2 + 2 = 4"},
        {"role": "user", "content": VERDICT_PROMPT},
    ]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(prompt, add_special_tokens=False).input_ids
    full_ids = tok(prompt + word, add_special_tokens=False).input_ids
    assert full_ids[: len(prompt_ids)] == prompt_ids
    assert len(full_ids) == len(prompt_ids) + 1
    assert tok.decode(full_ids[-1:]) == word
    assert tok(word, add_special_tokens=False).input_ids == full_ids[-1:]


def test_qwen2_digits_are_split(tokenizers: dict) -> None:
    tok = tokenizers["tiny-qwen2"]
    assert [p for p, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("12345")] == list("12345")
    tokens = tok.convert_ids_to_tokens(tok("37 + 48 = 85 and 12345", add_special_tokens=False).input_ids)
    digit_tokens = [t for t in tokens if any(c.isdigit() for c in t)]
    assert digit_tokens == list("374885") + list("12345")


def test_llama3_digits_grouped_by_three(tokenizers: dict) -> None:
    tok = tokenizers["tiny-llama"]
    assert [p for p, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("12345")] == ["123", "45"]
    tokens = tok.convert_ids_to_tokens(tok("37 + 48 = 85", add_special_tokens=False).input_ids)
    assert [t for t in tokens if any(c.isdigit() for c in t)] == ["37", "48", "85"]


def test_builds_are_byte_identical(tmp_path: Path, folders: dict[str, Path]) -> None:
    for name in NAMES:
        build_tiny(name, tmp_path / "a" / name)
        build_tiny(name, tmp_path / "b" / name)
        for file in ("tokenizer.json", "model.safetensors", "config.json", "generation_config.json"):
            digest = _sha256(tmp_path / "a" / name / file)
            assert digest == _sha256(tmp_path / "b" / name / file), (name, file)
            assert digest == _sha256(folders[name] / file), (name, file)  # same as the ensure_tiny build
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    build_tiny("tiny-llama", tmp_path / "seed1", seed=1)
    assert torch.equal(torch.rand(3), expected_draw)  # the caller's RNG state is left alone
    assert _sha256(tmp_path / "seed1" / "model.safetensors") != _sha256(
        tmp_path / "a" / "tiny-llama" / "model.safetensors"
    )
    assert _sha256(tmp_path / "seed1" / "tokenizer.json") == _sha256(
        tmp_path / "a" / "tiny-llama" / "tokenizer.json"
    )


def test_concurrent_ensure_tiny(tmp_path: Path, folders: dict[str, Path]) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        paths = pool.starmap(ensure_tiny, [("tiny-llama", tmp_path), ("tiny-llama", tmp_path)])
    target = tmp_path / "models" / f"tiny-llama-v{VERSION}"
    assert paths == [target, target]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".lock", target.name]
    # Built in other processes, yet identical to the in-process build.
    for file in ("tokenizer.json", "model.safetensors"):
        assert _sha256(target / file) == _sha256(folders["tiny-llama"] / file)
    assert AutoTokenizer.from_pretrained(target).eos_token == "<|eot_id|>"
    assert AutoModelForCausalLM.from_pretrained(target).config.model_type == "llama"
