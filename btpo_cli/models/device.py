"""``--device``: the torch device a judge or a sampler runs on, checked before anything loads."""

from __future__ import annotations

import os

import torch

from btpo_cli.errors import BtpoError, UsageError, did_you_mean

FORMS = ("cpu", "cuda", "cuda:N", "mps")


def resolve_device(device: str | None, flag: str = "--device") -> torch.device:
    """``device`` (default: ``cuda`` where a GPU is present, else ``cpu``) as a ``torch.device``.

    A string torch does not read as a device is a usage error (exit 2); ``cuda`` (or ``cuda:N``, ``mps``)
    on a machine without one is a named error (exit 1), not torch's ``AssertionError: Torch not compiled
    with CUDA enabled`` from deep inside a model load."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"{flag} {device!r}: expected one of {', '.join(FORMS)}"
                         f"{did_you_mean(device, ('cpu', 'cuda', 'mps'))}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BtpoError(f"{flag} {device}: CUDA is not available here ({_why_no_cuda()}); "
                            f"use {flag} cpu, or leave {flag} out (cuda where present)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BtpoError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                            "(cuda:0 …)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise BtpoError(f"{flag} {device}: Apple's MPS is not available here; use {flag} cpu")
    return dev


def _why_no_cuda() -> str:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible.strip():
        return "CUDA_VISIBLE_DEVICES is empty"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no GPU"
