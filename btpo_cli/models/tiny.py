"""Tiny models of real architectures, built locally on first use and cached.

``tiny-qwen2`` (Qwen2 architecture, Qwen2.5-Instruct-style tokenizer and chat template) and ``tiny-llama``
(Llama architecture, Llama-3.1-Instruct-style tokenizer and chat template) are randomly initialised
2-layer models with a hidden size of 64 (2 attention heads of 32, 1 KV head) and a byte-level BPE
vocabulary of about 1,500 tokens trained in code on a small deterministic corpus. They exist so that the test suite and the CLI's built-in default
model can exercise the whole pipeline (chat templates, special tokens, judge prompts, Yes/No and A/B
verdict tokens, causal-LM and sequence-classification heads, saving, loading, ``accelerate launch``)
in seconds on a CPU, with no download from the Hugging Face Hub. Their outputs are meaningless.

A model folder is built once into ``<cache root>/models/<name>-v<VERSION>`` (the cache root is
``$BTPO_CACHE`` or ``~/.cache/btpo``) and loads with plain ``transformers``: ``AutoTokenizer``,
``AutoModelForCausalLM`` and ``AutoModelForSequenceClassification``. Builds are deterministic: the same
name and seed give byte-identical files. Bump ``VERSION`` whenever anything that ends up on disk changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers.utils import logging as hf_logging

from btpo_cli import fsio
from btpo_cli.fsio import file_lock

VERSION = 2
"""Version of the tiny-model build (architecture, corpus, training); part of the cache folder name. v2: 2 attention heads of 32
(1 KV head) instead of 4 of 16 (2 KV heads): same parameter count, and a head dim vLLM's CPU
attention accepts (32, 64, 80, …)."""

Family = Literal["qwen2", "llama3"]

BPE_VOCAB_SIZE = 1500
"""Target size of the trained BPE vocabulary (256 byte symbols included, special tokens excluded)."""

MAX_POSITIONS = 4096
CORPUS_SEED = 20240726

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Pre-tokenizer regexes of the real tokenizers: Qwen2 isolates every digit, Llama 3 groups up to three.
QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# The Qwen2.5-Instruct chat template with its tool-calling parts removed.
QWEN2_CHAT_TEMPLATE = r"""{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}"""

# The Llama-3.1-Instruct chat template with its tool-calling parts removed. Like the real one it starts with
# the BOS text, so encoding the rendered text with add_special_tokens=True gives two BOS tokens.
LLAMA3_CHAT_TEMPLATE = r"""{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}

{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}"""

# Special tokens in id order, appended after the BPE vocabulary (as in the real tokenizers).
QWEN2_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]


@dataclass(frozen=True)
class TinySpec:
    """What one tiny model is: architecture, tokenizer family and sizes."""

    name: str
    family: Family
    model_type: Literal["qwen2", "llama"]
    tie_word_embeddings: bool
    description: str
    num_hidden_layers: int = 2
    hidden_size: int = 64
    intermediate_size: int = 128
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    """head dim = hidden_size / num_attention_heads = 32, the smallest vLLM's CPU attention runs."""
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6


TINY_MODELS: dict[str, TinySpec] = {
    "tiny-qwen2": TinySpec(
        name="tiny-qwen2",
        family="qwen2",
        model_type="qwen2",
        tie_word_embeddings=True,
        description="Qwen2 architecture, Qwen2.5-Instruct-style tokenizer and chat template",
        rope_theta=1_000_000.0,
    ),
    "tiny-llama": TinySpec(
        name="tiny-llama",
        family="llama3",
        model_type="llama",
        tie_word_embeddings=False,
        description="Llama architecture, Llama-3.1-Instruct-style tokenizer and chat template",
        rope_theta=500_000.0,
        rms_norm_eps=1e-5,
    ),
}


@dataclass(frozen=True)
class _FamilyTokens:
    """The roles special tokens play in one tokenizer family."""

    specials: list[str]
    bos: str | None  # the tokenizer's bos_token (None: no BOS, as in Qwen2)
    eos: str  # the chat end token: the tokenizer's eos_token and the model's eos_token_id
    pad: str
    text_end: str  # the end-of-text token; also stops generation
    config_bos: str  # bos_token_id written to the model config


_FAMILY_TOKENS: dict[str, _FamilyTokens] = {
    "qwen2": _FamilyTokens(
        specials=QWEN2_SPECIAL_TOKENS,
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        text_end="<|endoftext|>",
        config_bos="<|endoftext|>",
    ),
    "llama3": _FamilyTokens(
        specials=LLAMA3_SPECIAL_TOKENS,
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad="<|finetune_right_pad_id|>",
        text_end="<|end_of_text|>",
        config_bos="<|begin_of_text|>",
    ),
}


def tiny_cache_root() -> Path:
    """The btpo cache folder: ``$BTPO_CACHE`` if set, else ``~/.cache/btpo``."""
    env = os.environ.get("BTPO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "btpo"


# --------------------------------------------------------------------------------------------- corpus

_NAMES = [
    "Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Maria", "Omar", "Priya", "Sam",
    "Lucas", "Sofia", "Chen", "Aisha", "Jonas", "Nina", "Pedro", "Yuki",
]  # fmt: skip
_ADJECTIVES = [
    "small", "large", "old", "new", "quiet", "busy", "bright", "dark", "warm", "cold", "clean", "simple",
    "happy", "careful", "friendly", "useful", "difficult", "easy", "short", "long", "good", "bad", "best",
    "fresh", "heavy", "light", "cheap", "expensive", "strong", "weak", "fast", "slow", "early", "late",
    "healthy", "tired", "hungry", "beautiful", "strange", "important", "serious", "funny", "local",
    "modern", "ancient", "green", "blue", "red", "yellow", "empty", "full", "narrow", "wide", "gentle",
]  # fmt: skip
_NOUNS = [
    "dog", "cat", "house", "car", "garden", "kitchen", "book", "phone", "computer", "table", "window",
    "city", "school", "teacher", "student", "doctor", "friend", "family", "child", "market", "river",
    "train", "bus", "bike", "coffee", "tea", "bread", "apple", "water", "letter", "email", "meeting",
    "recipe", "plan", "budget", "question", "answer", "problem", "idea", "story", "song", "game",
    "mountain", "forest", "road", "bridge", "door", "chair", "bed", "shirt", "shoe", "jacket", "umbrella",
    "ticket", "map", "camera", "picture", "movie", "newspaper", "holiday", "birthday", "party", "gift",
    "neighbor", "manager", "customer", "engineer", "nurse", "farmer", "artist", "driver", "baker",
    "vegetable", "banana", "orange", "potato", "tomato", "cheese", "chicken", "rice", "soup", "salad",
    "medicine", "vacation", "weekend", "morning", "evening", "bathroom", "bedroom", "garage",
]  # fmt: skip
_VERBS = [
    "walks to", "looks at", "cleans", "opens", "closes", "reads", "writes", "buys", "sells", "cooks",
    "fixes", "finds", "needs", "likes", "visits", "carries", "checks", "explains", "shares", "helps with",
    "paints", "repairs", "remembers", "forgets", "orders", "delivers", "builds", "watches", "plays with",
    "talks about", "thinks about", "waits for", "searches for", "pays for", "learns about", "teaches",
    "prepares", "organizes", "describes", "compares", "measures", "borrows", "returns", "packs",
]  # fmt: skip
_PLACES = [
    "park", "store", "office", "library", "station", "beach", "museum", "hospital", "airport", "cafe",
    "restaurant", "bakery", "pharmacy", "bank", "gym", "theater", "stadium", "village", "harbor", "farm",
]  # fmt: skip
_TIMES = [
    "in the morning", "at night", "every day", "on Monday", "on the weekend", "after lunch", "before dinner",
    "this week", "last year", "tomorrow", "today", "at noon", "on Tuesday", "on Wednesday", "on Thursday",
    "on Friday", "on Saturday", "on Sunday", "in January", "in March", "in June", "in October", "in December",
    "during the summer", "during the winter", "in the spring", "in the autumn", "yesterday", "next month",
]  # fmt: skip
_TOPICS = [
    "cooking", "gardening", "travel", "health", "exercise", "sleep", "money", "saving", "math", "history",
    "science", "music", "writing", "programming", "weather", "pets", "shopping", "cleaning", "safety",
    "geography", "chemistry", "physics", "biology", "literature", "painting", "photography", "language",
    "nutrition", "fitness", "education", "privacy", "security", "medicine", "economics", "philosophy",
]  # fmt: skip
_QUESTIONS = [
    "How do I {v} a {n}?", "What is the best way to learn {t}?", "Can you help me with {t}?",
    "Why is the {n} so {a}?", "Where can I find a {a} {n}?", "Is it safe to leave the {n} {time}?",
    "What should I know about {t}?", "Could you explain {t} in simple words?", "How much does a {n} cost?",
]  # fmt: skip
_JUDGE_WORDS = [
    "helpful", "harmless", "honest", "safe", "unsafe", "harmful", "polite", "rude", "accurate", "correct",
    "incorrect", "relevant", "clear", "complete", "detailed", "concise", "toxic", "biased", "respectful",
    "response", "assistant", "user", "question", "answer", "instruction", "evaluation", "reasoning",
    "preference", "judge", "score", "rating", "better", "worse", "chosen", "rejected", "verdict", "final",
]  # fmt: skip
_STEPS = [
    "Let's think step by step.", "First, we read the question carefully.", "Next, we check each claim.",
    "Then, we compare the two responses.", "Finally, we decide which one is better.",
    "Step 1: understand the request.", "Step 2: check the facts.", "Step 3: look for harmful content.",
    "So the answer is {r}.", "Therefore, the result is {r}.", "This means the response is {w}.",
    "Let me think it through.", "Wait, let me check that again.", "The reasoning is sound.",
    "The response follows the instruction.", "The response does not answer the question.",
]  # fmt: skip
_EVAL_PROMPT = "Evaluate your previous response for helpful and harmless. Think it through step by step."
_VERDICT_PROMPT = "Based on your evaluation, is the response correct? Strict format: Yes/No"
_SYSTEM_LINES = [
    QWEN_DEFAULT_SYSTEM,
    "You are a helpful assistant.",
    "You are a fair and careful judge.",
    "Cutting Knowledge Date: December 2023",
    "Today Date: 26 Jul 2024",
    "system",
    "user",
    "assistant",
]
_CODE = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    "if x > 0:\n    y = x * 2\nelse:\n    y = 0\n",
    'print("Hello, world!")\n',
    "total = sum(values) / len(values)\n",
]


def _corpus() -> list[str]:
    """A deterministic training corpus of a few thousand short documents."""
    rng = random.Random(CORPUS_SEED)
    docs: list[str] = []

    def sentence() -> str:
        return (
            f"The {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} "
            f"the {rng.choice(_PLACES)} {rng.choice(_TIMES)}."
        )

    def question() -> str:
        return rng.choice(_QUESTIONS).format(
            v=rng.choice(_VERBS).split()[0],
            n=rng.choice(_NOUNS),
            a=rng.choice(_ADJECTIVES),
            t=rng.choice(_TOPICS),
            time=rng.choice(_TIMES),
        )

    def arithmetic() -> str:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-*")
        result = a + b if op == "+" else a - b if op == "-" else a * b
        return f"{a} {op} {b} = {result}"

    def step() -> str:
        return rng.choice(_STEPS).format(r=rng.randint(0, 200), w=rng.choice(_JUDGE_WORDS))

    for _ in range(800):
        name = rng.choice(_NAMES)
        docs.append(f"{name} says: {sentence()} {sentence()}")
        docs.append(
            f"{rng.choice(_NAMES)} {rng.choice(_VERBS)} a {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} "
            f"because it is {rng.choice(_ADJECTIVES)}. I think the {rng.choice(_NOUNS)} is "
            f"{rng.choice(_ADJECTIVES)}, but the {rng.choice(_NOUNS)} is not."
        )
    for _ in range(500):
        docs.append(question())
        docs.append(f"{question()}\n{sentence()}")
    for _ in range(600):
        docs.append(arithmetic())
    for _ in range(200):
        docs.append(f"What is {arithmetic().split(' = ')[0]}? Let's think step by step. {arithmetic()}.")
    for _ in range(400):
        words = rng.sample(_JUDGE_WORDS, 4)
        docs.append(f"The {words[0]} response is {words[1]}, {words[2]} and {words[3]}.")
        docs.append(" ".join(step() for _ in range(3)))
    for _ in range(300):
        docs.append(_EVAL_PROMPT)
        docs.append(_VERDICT_PROMPT)
        docs.append(f"{step()}\n\n{step()}\n{step()}")
    for _ in range(600):
        verdict = rng.choice(["Yes", "No"])
        docs.append(verdict)
        docs.append(f"{verdict}, the response is {rng.choice(_JUDGE_WORDS)}.")
        docs.append(f"Answer: {verdict}")
        docs.append(f"Is the response {rng.choice(_JUDGE_WORDS)}? {verdict}.")
    for _ in range(400):
        choice = rng.choice("AB")
        other = "B" if choice == "A" else "A"
        docs.append(choice)
        docs.append(f"[[{choice}]]")
        docs.append(f"Response {choice} is better than response {other}. Final verdict: [[{choice}]]")
        docs.append(f"<score>{rng.randint(1, 10)}</score>")
        docs.append(f"Score: {rng.randint(0, 10)}/10 <score>{rng.randint(1, 10)}</score>")
    for _ in range(100):
        docs.extend(_SYSTEM_LINES)
        docs.append(rng.choice(_CODE))
    return docs


# ------------------------------------------------------------------------------------------ tokenizer


def _family(family: str) -> _FamilyTokens:
    if family not in _FAMILY_TOKENS:
        raise ValueError(f"unknown tokenizer family {family!r}; expected one of {sorted(_FAMILY_TOKENS)}")
    return _FAMILY_TOKENS[family]


def _special(content: str) -> AddedToken:
    return AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)


def _backend_tokenizer(family: str) -> Tokenizer:
    """Train the byte-level BPE tokenizer of one family (tokenizers library objects only)."""
    tokens = _family(family)
    qwen = family == "qwen2"
    tok = Tokenizer(
        BPE(unk_token=None, fuse_unk=False, byte_fallback=False, ignore_merges=not qwen),
    )
    if qwen:
        tok.normalizer = normalizers.NFC()
    regex = QWEN2_PRETOKENIZE_REGEX if qwen else LLAMA3_PRETOKENIZE_REGEX
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=not qwen, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = _corpus()
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    if qwen:
        tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    else:
        assert tokens.bos is not None
        bos_id = tok.get_vocab_size() + tokens.specials.index(tokens.bos)
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
                processors.TemplateProcessing(
                    single=f"{tokens.bos} $A",
                    pair=f"{tokens.bos} $A {tokens.bos}:1 $B:1",
                    special_tokens=[(tokens.bos, bos_id)],
                ),
            ]
        )
    tok.add_special_tokens([_special(t) for t in tokens.specials])
    return tok


def build_tokenizer(family: str) -> transformers.PreTrainedTokenizerFast:
    """Train the tokenizer of ``family`` ("qwen2" or "llama3") and wrap it for transformers, chat template set."""
    tokens = _family(family)
    backend = _backend_tokenizer(family)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=tokens.bos,
        eos_token=tokens.eos,
        pad_token=tokens.pad,
        unk_token=None,
        model_max_length=MAX_POSITIONS,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        chat_template=QWEN2_CHAT_TEMPLATE if family == "qwen2" else LLAMA3_CHAT_TEMPLATE,
    )


# ------------------------------------------------------------------------------------------------ model


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Hide transformers' progress bars (e.g. "Writing model shards") while building."""
    enabled = hf_logging.is_progress_bar_enabled()
    if enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def build_tiny(name: str, out_dir: Path, seed: int = 0) -> None:
    """Build the tiny model ``name`` (tokenizer, config, seeded random weights) into ``out_dir``."""
    import torch  # heavy: imported on use

    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; expected one of {sorted(TINY_MODELS)}")
    spec = TINY_MODELS[name]
    tokens = _family(spec.family)
    tokenizer = build_tokenizer(spec.family)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tokens.specials}
    vocab_size = -(-len(tokenizer) // 64) * 64
    common = {
        "vocab_size": vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "max_position_embeddings": MAX_POSITIONS,
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta},
        "rms_norm_eps": spec.rms_norm_eps,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "pad_token_id": ids[tokens.pad],
        "bos_token_id": ids[tokens.config_bos],
        "eos_token_id": ids[tokens.eos],
        "dtype": "float32",
    }
    config: transformers.PreTrainedConfig
    if spec.model_type == "qwen2":
        config = transformers.Qwen2Config(
            use_sliding_window=False, max_window_layers=spec.num_hidden_layers, **common
        )
    else:
        config = transformers.LlamaConfig(attention_bias=False, mlp_bias=False, **common)
    config.architectures = [f"{type(config).__name__.removesuffix('Config')}ForCausalLM"]

    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG state
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=ids[tokens.config_bos],
        pad_token_id=ids[tokens.pad],
        eos_token_id=[ids[tokens.eos], ids[tokens.text_end]],
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _quiet_progress_bars():
        model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    info = {
        "name": name,
        "version": VERSION,
        "seed": seed,
        "family": spec.family,
        "description": spec.description,
    }
    (out_dir / "btpo_tiny.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


_REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "btpo_tiny.json",
)


def _is_complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / f).is_file() for f in _REQUIRED_FILES)


def make_readable(folder: Path) -> None:
    """Make the folder readable by all (mkdtemp and safetensors create it 0o700 / files 0o600)."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o644)


def publish_folder(target: Path, build: Callable[[Path], None]) -> Path:
    """``build`` a folder beside ``target``, make it readable by all and publish it in place
    (:func:`btpo_cli.fsio.publish_folder`: an incomplete leftover at ``target`` is replaced; a failure
    or a kill leaves no half-built ``target``). Call it under :func:`file_lock`."""

    def build_readable(tmp: Path) -> None:
        build(tmp)
        make_readable(tmp)

    return fsio.publish_folder(target, build_readable)


def ensure_tiny(name: str, cache_root: Path | None = None) -> Path:
    """Return the folder of tiny model ``name``, building it first if it is not in the cache.

    Safe when several processes call it at once: the build happens under a file lock, in a temporary
    folder next to the target that is then renamed into place.
    """
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; expected one of {sorted(TINY_MODELS)}")
    models_dir = Path(cache_root if cache_root is not None else tiny_cache_root()) / "models"
    target = models_dir / f"{name}-v{VERSION}"
    if _is_complete(target):
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(models_dir / ".lock"):
        if _is_complete(target):  # another process built it while we waited
            return target
        return publish_folder(target, lambda tmp: build_tiny(name, tmp))   # replaces an incomplete leftover
