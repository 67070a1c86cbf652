"""Training: one set-up, two loops, and the mechanics they share.

| module | owns |
|---|---|
| ``launch`` | ``btpo train``'s lifecycle (lock, method's ``train``, release); reading a split |
| ``launcher`` | ``btpo train --gpus N``: ``accelerate launch`` with the recipe's strategy config; signal forwarding |
| ``preflight`` | the start-up check (launched strategy vs. recipe and plan) and the ``launch`` record |
| ``preempt`` | SIGTERM / SIGUSR1: every rank stops at the next step boundary with a checkpoint (exit 75) |
| ``accelerator`` | the accelerator for the strategy ``accelerate launch`` was given |
| ``session`` | ``TrainSession``: tokenizer, policy, reference, optimizer, resume, weight export, ``final/`` |
| ``steps`` | data order, micro-batches, optimizer/schedule, one accumulated step, metrics, timing |
| ``supervised`` | the supervised loop (bt, bt-prefilled, gram) |
| ``rollouts`` | the rollout → update loop (btpo, grpo-pair, grpo-point) and the sampling + no-grad scoring their rollouts share |
| ``sharding`` | DDP / FSDP2 / ZeRO: full weights out shard by shard, sync boundaries |
| ``tracking`` | TensorBoard / W&B, GPU memory metrics |
| ``periodic_eval`` | ``train.eval_every``: held-out pairs, ``eval/`` rows, ``best/``, early stopping |
"""
