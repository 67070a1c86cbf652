"""docs/architecture.md as tests: no import cycle, its layers, a true reason for every function-level import,
no stale names, and its "top to bottom" sections equal to what the commands import (traced).

The analysis is ``tests/invariants/archmap.py`` (source read as AST, nothing imported); each guard is also fed
a small synthetic project here, to show it reports what it must.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DIST_ENV, LOG_ENV, ONE_THREAD, REPO, USER_LOG_ENV
from tests.invariants import archmap

DOC = REPO / "docs" / "architecture.md"


@pytest.fixture(scope="module")
def graph() -> archmap.Graph:
    return archmap.scan(REPO)


def test_no_import_cycle(graph: archmap.Graph) -> None:
    """Counting imports inside functions and the registries' imports by name."""
    assert archmap.cycles(graph.internal()) == []
    registry = [e for e in graph.edges if e.kind == "dynamic"]
    assert {e.dst for e in registry if e.src == "btpo_cli.methods"} >= {"btpo_cli.methods.btpo", "btpo_cli.methods.bt"}
    assert {e.dst for e in registry if e.src == "btpo_cli.engines"} >= {"btpo_cli.engines.hf", "btpo_cli.engines.vllm"}


def test_the_layers_of_the_doc_hold(graph: archmap.Graph) -> None:
    layers = archmap.parse_layers(DOC.read_text())
    assert len(layers) >= 10 and ["data"] in layers
    assert archmap.layer_breaks(graph, layers) == []


def test_every_function_level_import_has_a_true_reason(graph: archmap.Graph) -> None:
    assert archmap.unreasoned_imports(graph) == []
    assert sum(e.kind == "function" for e in graph.edges) > 50      # the scan sees them


def test_no_stale_names_in_code_and_docs(graph: archmap.Graph) -> None:
    assert archmap.stale_names(graph) == []


# --- each guard fails when it must -------------------------------------------------------------------------

def _project(tmp: Path, files: dict[str, str], doc: str = "") -> archmap.Graph:
    for name, text in {"btpo_cli/__init__.py": "", **files}.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(text)
    (tmp / "docs").mkdir(exist_ok=True)
    (tmp / "docs" / "architecture.md").write_text(doc)
    (tmp / "pyproject.toml").write_text("")
    return archmap.scan(tmp)


def test_a_cycle_through_a_function_or_a_registry_is_found(tmp_path: Path) -> None:
    g = _project(tmp_path, {
        "btpo_cli/a.py": "def f():\n    from btpo_cli import b  # heavy: imported on use\n",
        "btpo_cli/b.py": "import importlib\nNAMES = ('c',)\n\ndef load(n):\n"
                         "    return importlib.import_module(f'btpo_cli.{n}')\n",
        "btpo_cli/c.py": "import btpo_cli.a\n",
    })
    assert archmap.cycles(g.internal()) == [["btpo_cli.a", "btpo_cli.b", "btpo_cli.c"]]
    assert archmap.cycles(g.internal(("top",))) == []      # what a top-level-only tool would see


def test_a_layer_break_and_an_unplaced_module_are_found(tmp_path: Path) -> None:
    doc = "Layers, from the bottom:\n\n1. `errors`, `models.a/b` — leaves\n2. `cli` — top\n\nEnd.\n"
    g = _project(tmp_path, {
        "btpo_cli/errors.py": "def f():\n    from btpo_cli.cli import main  # heavy: no\n",
        "btpo_cli/models/__init__.py": "", "btpo_cli/models/a.py": "from btpo_cli.models import b\n",
        "btpo_cli/models/b.py": "", "btpo_cli/cli.py": "from btpo_cli import errors\n",
        "btpo_cli/extra.py": "",
    }, doc=doc)
    layers = archmap.parse_layers((tmp_path / "docs" / "architecture.md").read_text())
    assert layers == [["errors", "models.a", "models.b"], ["cli"]]
    found = archmap.layer_breaks(g, layers)
    assert any("btpo_cli.errors (layer 1) imports btpo_cli.cli (layer 2)" in f for f in found)
    assert "btpo_cli.extra is in no layer of docs/architecture.md" in found
    assert not any("models.a (layer" in f or "btpo_cli.cli (layer 2) imports" in f for f in found)


def test_imports_without_a_true_reason_are_found(tmp_path: Path) -> None:
    g = _project(tmp_path, {
        "btpo_cli/light.py": "import json\n",
        "btpo_cli/heavy.py": "import torch\n",
        "btpo_cli/via.py": "from btpo_cli import heavy\n",
        "btpo_cli/user.py": "def f():\n"
                            "    from btpo_cli import light  # heavy: imported on use\n"
                            "    from btpo_cli import via  # heavy: imported on use\n"
                            "    import vllm  # optional extra\n"
                            "    import yaml  # optional extra\n"
                            "    import json\n",
    })
    found = archmap.unreasoned_imports(g)
    assert len(found) == 3, found
    assert "btpo_cli/user.py:2 imports btpo_cli.light: says '# heavy'" in found[0]
    assert "imports yaml: says '# optional'" in found[1]
    assert "btpo_cli/user.py:6 imports json: no reason" in found[2]


def test_stale_names_are_found(tmp_path: Path) -> None:
    g = _project(tmp_path, {
        "btpo_cli/runs/__init__.py": "", "btpo_cli/runs/folder.py": "def hold():\n    pass\n",
        "btpo_cli/loop.py": '"""The mirror of ``rl_loop.py``; see btpo_cli/runs/folder.py and ``folder.hold``."""\n'
                            "# btpo_cli.runs.gone, btpo_cli.runs.folder.hold and ``folder.release``\n",
    }, doc="Held in `runlock.py` (`btpo_cli/runlock.py`); `plan_measure` measures; `hold` is fine.\n")
    found = archmap.stale_names(g)
    assert sorted(f.split(": ", 1)[1] for f in found) == sorted(
        ["rl_loop.py", "btpo_cli.runs.gone", "folder.release", "btpo_cli/runlock.py", "runlock.py",
         "plan_measure"]), found


# --- the "top to bottom" sections, traced --------------------------------------------------------------------

def _trace(out: Path, *args: str) -> dict[str, list[str]]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV and k not in LOG_ENV}
    env.update(USER_LOG_ENV)
    env.update(ONE_THREAD)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-m", "tests.invariants.trace_modules", str(out), *args], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory, synthetic_data: Path) -> dict[str, dict[str, list[str]]]:
    """One BTPO step on tiny-qwen2 and ``btpo eval`` of it (2 pairs), each in a fresh interpreter."""
    tmp = tmp_path_factory.mktemp("traced")
    run = tmp / "run"
    train = _trace(tmp / "train.json", "train", "--method", "btpo", "--model", "tiny-qwen2", "--data",
                   str(synthetic_data), "--out", str(run), "--max-steps", "1", "--set", "rollout.batch_size=4",
                   "--set", "train.batch_size=2", "--set", "train.micro_batch_size=1", "--set", "rollout.n=2",
                   "--set", "rollout.max_new_tokens=8", "--set", "data.max_length=128")
    ev = _trace(tmp / "eval.json", "eval", "--checkpoint", str(run), "--limit", "2")
    return {"train": train, "eval": ev, "run": {"path": [str(run)]}}


def _section(title: str) -> str:
    doc = DOC.read_text()
    start = doc.index(f"## {title}")
    end = doc.find("\n## ", start + 1)
    return doc[start:end if end > 0 else None]


def _full(name: str) -> str:
    return name if name.split(".")[0] in archmap.ROOTS else f"btpo_cli.{name}"


@pytest.mark.parametrize(("title", "key"), [("One BTPO step", "train"), ("One `btpo eval", "eval")])
def test_top_to_bottom_sections_are_what_the_command_imports(traced, title: str, key: str) -> None:
    """The section's table: ``(N files)`` rows, each a module the command imported; its closing paragraph:
    the counts of modules at start-up and once the command runs, and the latter by name."""
    text, trace = _section(title), traced[key]
    rows = re.findall(r"^\| \d+ \| `(btpo_cli/[\w/]+\.py)`", text, re.M)
    assert f"({len(rows)} files)" in text.splitlines()[0]
    imported = set(trace["startup"]) | set(trace["command"])
    assert [r for r in rows if archmap.module_name(Path(r)) not in imported] == []
    flat = " ".join(text.split())
    m = re.search(r"imports (\d+) project modules: (\d+) at start-up.*? and these (\d+) once it runs, in import "
                  r"order: (.*?)(?:\.\s|\s\()", flat)
    assert m, f"docs/architecture.md '{title}': no 'imports N project modules: …' paragraph"
    total, startup, n, names = int(m[1]), int(m[2]), int(m[3]), re.findall(r"`([\w.]+)`", m[4])
    listed = [_full(x) for x in names]
    assert (total, startup, n) == (len(imported), len(trace["startup"]), len(trace["command"])), trace["command"]
    assert sorted(listed) == sorted(trace["command"]), f"doc: {listed}\ntraced: {trace['command']}"


SERVE_AND_SCORE = """
import io, json, sys
from btpo_cli import load_judge
from btpo_cli.serving import scoring
from btpo_cli.serving.http import create_app
from fastapi.testclient import TestClient
with load_judge(sys.argv[1], device="cpu") as judge:
    out = io.StringIO()
    s = scoring.score_lines(judge, io.StringIO(json.dumps({"prompt": "2 + 3?", "response": "5"}) + "\\n"), "in", out)
    assert s.lines == 1 and s.errors == 0, out.getvalue()
    with TestClient(create_app(judge)) as client:
        r = client.post("/v1/score", json={"prompt": "2 + 3?", "response": "5"})
        assert r.status_code == 200, r.text
print(json.dumps([m for m in sys.modules if m.startswith("btpo_cli")]))
"""


def test_score_and_serve_import_no_training_module(traced) -> None:
    """``load_judge`` + ``btpo score``'s ``score_lines`` + ``btpo serve``'s app, one item each, in a fresh
    interpreter: no ``btpo_cli.training`` module is imported (a judge is not a trainer)."""
    pytest.importorskip("fastapi")
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(ONE_THREAD)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", SERVE_AND_SCORE, traced["run"]["path"][0]], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    mods = json.loads(p.stdout.strip().splitlines()[-1])
    assert "btpo_cli.serving.http" in mods and "btpo_cli.methods.btpo" in mods
    assert [m for m in mods if m.startswith("btpo_cli.training")] == []
