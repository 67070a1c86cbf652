"""scripts/slurm/train.sbatch under fake srun / scontrol: nodes and ranks from Slurm, the strategy left to
the recipe (btpo train --gpus), --resume on every (re)start, and a requeue when btpo exits 75."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

SBATCH = REPO / "scripts" / "slurm" / "train.sbatch"


def fake_slurm(tmp_path: Path, btpo_rc: int) -> tuple[dict[str, str], Path]:
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    calls = tmp_path / "calls.txt"
    scripts = {
        "srun": '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
        "scontrol": f'#!/bin/bash\nif [ "$1" = show ]; then printf "node-a\\nnode-b\\n"; '
                    f'else echo "scontrol $*" >> {calls}; fi\n',
        "fakebtpo": f'#!/bin/bash\nif [ "$1" = recipes ]; then echo "out: runs/from-recipe"; exit 0; fi\n'
                    f'echo "btpo $*" >> {calls}\nexit {btpo_rc}\n',
    }
    for name, text in scripts.items():
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}{os.pathsep}{os.environ['PATH']}", "BTPO": str(bin_ / "fakebtpo"),
           "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_NNODES": "2", "SLURM_NODEID": "1",
           "GPUS_PER_NODE": "4"}
    return env, calls


@pytest.mark.parametrize("rc", [0, 75, 1])
def test_sbatch_launches_through_btpo_and_requeues_on_75(tmp_path: Path, rc: int) -> None:
    env, calls = fake_slurm(tmp_path, rc)
    p = subprocess.run(["bash", str(SBATCH), "btpo/qwen2.5-7b-hh", "--set", "optim.lr=1e-6"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == rc, p.stderr
    lines = calls.read_text().splitlines()
    assert lines[0] == ("btpo train --recipe btpo/qwen2.5-7b-hh --resume --log-every 50 --gpus 4 --nodes 2 "
                        "--node-rank 1 --main-address node-a --main-port 29500 --set optim.lr=1e-6 "
                        "--out runs/from-recipe")
    assert "--config_file" not in lines[0]                       # the strategy is the recipe's, via btpo
    assert (lines[1:] == ["scontrol requeue 77"]) == (rc == 75), lines
