"""A trained judge in use from the shell and over HTTP.

| module | owns |
|---|---|
| ``scoring`` | ``btpo score``: JSONL in, one JSONL result per line out, batched through a judge |
| ``http`` | ``btpo serve``: FastAPI app, batcher, limits |
"""
