"""Judging: from prompts and responses to scores, verdicts and the eval protocol.

| module | owns |
|---|---|
| ``templates`` | every prompt the models see; one cutting rule per prompt kind |
| ``parsers`` | ``[[A]]``/``[[B]]`` verdicts and ``<score>N</score>`` scores |
| ``gpm`` | the dialog GPM's sequences and its one-pass scoring (thought log-probs, p(Yes)) |
| ``judge`` | ``Judge``: score / compare / best-of-n / evaluate_pairs; ``load_judge``; ``RewardFunction`` |
| ``protocol`` | METHOD.md §7: order-swapped accuracy clipped at 50%, ``PairResult``, ``summarize`` |
| ``lm_head`` | thought log-probs from hidden states in chunks, the LM head recomputed in backward (``train.chunked_logprobs``) |
| ``benchmarks/`` | one module per field benchmark: reader + official aggregate; ``run_benchmark``: ``btpo eval --benchmark`` |
| ``run_eval`` | ``btpo eval``: a run's ``final/`` (or any model) on a split → ``eval/<dataset>.json`` |
"""
