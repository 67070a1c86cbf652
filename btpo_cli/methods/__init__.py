"""The method registry: one place that declares every training method.

Each method module ends with ``register_method(MethodSpec(...))``. The CLI's choices and help
text, ``config`` validation and ``btpo compare``'s row order are all derived from here, and the
rest of what is particular to a method lives in its module: its config section, checks and 0.1
key renames (``btpo_cli.config.register_section``), ``btpo plan``'s memory geometry
(``plan_geometry``, ``plan_inputs``), its model card (``card``), eval settings (``eval_settings``) and
eval-summary entries (``eval_summary``), the training curves ``btpo compare --plot`` draws (``curves``)
and whether compare measures the other rows against it (``compare_baseline``). A rollout-based method
carries what its loss needs beyond the shared log-probs in ``Rollout.payload``, a type of its own.
So a new method is one file plus its recipes:

| method        | module                       | trains and saves                     | protocol |
|---------------|------------------------------|--------------------------------------|----------|
| bt            | ``methods/bt.py``            | AutoModelForSequenceClassification   | pointwise |
| bt-prefilled  | ``methods/bt_prefilled.py``  | AutoModelForSequenceClassification   | pointwise |
| gram          | ``methods/gram.py``          | AutoModelForCausalLM                 | pairwise (both orders) |
| grpo-pair     | ``methods/grpo_pair.py``     | AutoModelForCausalLM                 | pairwise (both orders) |
| grpo-point    | ``methods/grpo_point.py``    | AutoModelForCausalLM                 | pointwise |
| btpo          | ``methods/btpo.py``          | AutoModelForCausalLM                 | pointwise (greedy thought, then p(Yes)) |

Methods from elsewhere register the same way: a module named in ``BTPO_PLUGINS``
(comma-separated) or exposed under the ``btpo.plugins`` entry-point group is imported before the
registry is first read, and its ``register_method`` calls join the table.

A method module imports without torch (``btpo --help`` and ``build_config`` read the registry):
torch and the training modules are imported in the functions that use them (:func:`no_grad` for
``@torch.no_grad()``).
"""

from __future__ import annotations

import contextlib
import importlib
import os
from importlib.metadata import entry_points

from btpo_cli.errors import BtpoError
from btpo_cli.methods import spec as _spec
from btpo_cli.methods.spec import (
    Card,
    MethodSpec,
    available,
    get_method,
    method_names,
    method_specs,
    no_grad,
    register_method,
)

__all__ = ["Card", "MethodSpec", "available", "get_method", "method_names", "method_specs", "no_grad",
           "register_method"]

_BUILTIN = ("bt", "bt_prefilled", "gram", "grpo_pair", "grpo_point", "btpo")
_REGISTRY = _spec._REGISTRY
_loaded = False


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _BUILTIN:
        importlib.import_module(f"btpo_cli.methods.{mod}")
    plugins = [m.strip() for m in os.environ.get("BTPO_PLUGINS", "").split(",") if m.strip()]
    with contextlib.suppress(Exception):  # a broken distribution must not break btpo itself
        plugins += [ep.value for ep in entry_points(group="btpo.plugins")]
    for mod in plugins:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise BtpoError(f"plugin module '{mod}' (BTPO_PLUGINS / btpo.plugins) could not be imported: {e}") from e


_spec._loader = _load
