"""A trained judge in use from the shell and over HTTP.

| module | owns |
|---|---|
| ``scoring`` | ``btpo score``: JSONL in, one JSONL result per line out, batched through a judge |
| ``rewards`` | RL frameworks' reward requests (OpenRLHF ``/get_reward``, batch) → judge items |
| ``http`` | ``btpo serve``: FastAPI app, batcher, limits |
"""
