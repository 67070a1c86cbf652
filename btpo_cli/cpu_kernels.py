"""Fixed CPU kernels for the runs whose digits the README promises (``btpo demo``, ``btpo base-model``).

With the same library versions, two x86-64 machines still compute different floats when their CPUs
differ: MKL chooses its sgemm kernels (and with them the summation order) by the CPU's finer features,
and torch dispatches its own vectorized kernels by the CPU's capability (AVX2, AVX512). Two machines of
the project's kind with the locked versions built different tiny-thinkers that way (docs/environment.md).
MKL's conditional numerical reproducibility (``MKL_CBWR=AVX2,STRICT``: the AVX2 code path on any CPU that
has AVX2, independent of memory alignment) and ``ATEN_CPU_CAPABILITY=avx2`` remove both choices, so the
same thread count gives the same bits on every such CPU.

Both variables are read when MKL and torch's dispatcher first run, so :func:`pin` must run before any
torch computation in the process: the CLI calls it first thing for the commands above. A user's own
value of either variable wins; ``BTPO_CPU_KERNELS=native`` keeps the machine's fastest kernels.
"""

from __future__ import annotations

import os

PINNED = {"MKL_CBWR": "AVX2,STRICT", "ATEN_CPU_CAPABILITY": "avx2"}
OPT_OUT = "BTPO_CPU_KERNELS"
PINNED_COMMANDS = ("demo", "base-model")


def pin(environ: dict[str, str] | None = None) -> None:
    """Set the fixed kernels in ``environ`` (default: this process's) unless opted out or set by the user."""
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT, "").lower() == "native":
        return
    for k, v in PINNED.items():
        env.setdefault(k, v)


def pinned_env() -> dict[str, str]:
    """This process's environment with the fixed kernels (for a child that must compute like the reference)."""
    env = dict(os.environ)
    env.pop(OPT_OUT, None)
    env.update(PINNED)
    return env


def described() -> str:
    """``MKL_CBWR=… ATEN_CPU_CAPABILITY=…`` as this process runs (``native`` where neither is set)."""
    got = [f"{k}={os.environ[k]}" for k in PINNED if os.environ.get(k)]
    return " ".join(got) or "native"


def is_pinned() -> bool:
    """Whether this process computes with the fixed kernels."""
    return all(os.environ.get(k) == v for k, v in PINNED.items())
