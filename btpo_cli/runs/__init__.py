"""The run folder and everything written into it.

| module | owns |
|---|---|
| ``folder`` | ``runs/NAME/`` layout: config.yaml, env.json, metrics.jsonl, data_skips.json, ``checkpoints/`` (atomic saves, resume) |
| ``lock`` | ``RUN/.lock``: one training process per run folder |
| ``status`` | ``btpo status``: finished / stopped / running / broken, with exit codes for scripts |
| ``final`` | ``final/btpo.json`` (what a judge needs to load itself), reading it back, the model card ``final/README.md`` |
"""
