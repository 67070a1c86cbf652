"""btpo: train generative preference models with Bradley-Terry Policy Optimization.

The Python API of a trained judge (``docs/judge.md``) is importable from here::

    from btpo_cli import load_judge
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_JUDGE_API = ("load_judge", "Judge", "Score", "Comparison", "BestOfN", "RewardFunction")


def __getattr__(name: str) -> Any:
    """The judge API, imported on first use (``btpo --version`` stays fast)."""
    if name in _JUDGE_API:
        from btpo_cli.judging import judge  # root package: imports no module of its own at its top

        return getattr(judge, name)
    raise AttributeError(f"module 'btpo_cli' has no attribute {name!r}")


__all__ = ["__version__", *_JUDGE_API]
