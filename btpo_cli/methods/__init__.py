"""Training methods. Each module exposes ``train(cfg, run, resume)`` and ``evaluate(...)``.

| method        | module                 | protocol  |
|---------------|------------------------|-----------|
| bt            | ``methods/bt.py``      | pointwise |
| btpo          | ``methods/btpo.py``    | pointwise (greedy thought, then p(Yes)) |
"""

from __future__ import annotations

import importlib
from types import ModuleType

from btpo_cli.errors import BtpoError

_MODULES = {
    "bt": "btpo_cli.methods.bt",
    "btpo": "btpo_cli.methods.btpo",
}


def get_method(name: str) -> ModuleType:
    if name not in _MODULES:
        raise BtpoError(f"method '{name}' is not implemented yet (available: {', '.join(_MODULES)})")
    return importlib.import_module(_MODULES[name])


def available() -> list[str]:
    return list(_MODULES)
