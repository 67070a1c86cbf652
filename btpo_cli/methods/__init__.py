"""Training methods. Each module exposes ``train(cfg, run, resume)`` and ``evaluate(...)``.

| method        | module                 | protocol  |
|---------------|------------------------|-----------|
| bt            | ``methods/bt.py``      | pointwise |
| bt-prefilled  | ``methods/bt_prefilled.py`` | pointwise |
| gram          | ``methods/gram.py``    | pairwise (both orders) |
| grpo-pair     | ``methods/grpo_pair.py`` | pairwise (both orders) |
| grpo-point    | ``methods/grpo_point.py`` | pointwise |
| btpo          | ``methods/btpo.py``    | pointwise (greedy thought, then p(Yes)) |
"""

from __future__ import annotations

import importlib
from types import ModuleType

from btpo_cli.errors import BtpoError

_MODULES = {
    "bt": "btpo_cli.methods.bt",
    "btpo": "btpo_cli.methods.btpo",
    "bt-prefilled": "btpo_cli.methods.bt_prefilled",
    "gram": "btpo_cli.methods.gram",
    "grpo-pair": "btpo_cli.methods.grpo_pair",
    "grpo-point": "btpo_cli.methods.grpo_point",
}


def get_method(name: str) -> ModuleType:
    if name not in _MODULES:
        raise BtpoError(f"unknown method '{name}' (available: {', '.join(_MODULES)})")
    try:
        return importlib.import_module(_MODULES[name])
    except ModuleNotFoundError as e:
        if e.name == _MODULES[name]:
            raise BtpoError(f"method '{name}' is not implemented yet") from e
        raise


def available() -> list[str]:
    return list(_MODULES)
