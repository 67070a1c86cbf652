"""Shared fixtures: one tiny-model cache and one small synthetic dataset per test session."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from btpo_cli.console import QUIET_ENV

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    """Children that the tests start get SIGINT at its default, whatever this process inherited: a
    shell starts background jobs (``cmd &``, nohup, some CI runners) with SIGINT ignored, and an
    ignored disposition survives exec, so the Ctrl-C tests would send a signal nobody receives.
    A Python-level handler here is reset to the default in every exec'd child."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@functools.cache
def vllm_import_error() -> str | None:
    """Why ``import vllm`` fails here (None: it works). Imported once per session."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"      # what btpo_cli.engines.vllm sets too
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or a broken build (e.g. CUDA torchvision on a CPU machine)
        return f"{type(e).__name__}: {e}"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.vllm`` tests skip where vLLM does not import, and FAIL instead under
    ``BTPO_REQUIRE_VLLM=1`` (what scripts/test.sh sets in .venv-vllm): CI never passes by skipping."""
    if item.get_closest_marker("vllm") is None:
        return
    err = vllm_import_error()
    if err is None:
        return
    if os.environ.get("BTPO_REQUIRE_VLLM") == "1":
        pytest.fail(f"BTPO_REQUIRE_VLLM=1 but vLLM does not import: {err}", pytrace=False)
    pytest.skip(f"vLLM not installed here ({err}); `bash scripts/setup.sh --with-vllm` makes .venv-vllm")


@pytest.fixture(scope="session", autouse=True)
def _btpo_cache(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Path]:
    """Build tiny models once per session into a private cache (never ~/.cache)."""
    root = Path(os.environ.get("BTPO_TEST_CACHE") or tmp_path_factory.mktemp("btpo_cache"))
    os.environ["BTPO_CACHE"] = str(root)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if any(item.nodeid.endswith(FRESH_THINKER_TEST) for item in request.session.items):
        _THINKER.append(_start_thinker_build(root))
    yield root
    for proc, _ in _THINKER:
        if proc.poll() is None:      # the session stopped early (-x): no build left behind (nor its child)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


FRESH_THINKER_TEST = "test_demo.py::test_demo_quick_from_a_fresh_thinker_btpo_beats_base_and_bt"
_THINKER: list[tuple[subprocess.Popen, Path]] = []


def _start_thinker_build(root: Path) -> tuple[subprocess.Popen, Path]:
    """``btpo base-model`` (tiny-thinker seed 0, pre-trained on ONE thread: minutes) into this session's
    cache, started when the session starts, at the lowest CPU priority: it runs on the core that the
    (mostly single-threaded) tests leave idle and is done, or nearly, when the demo test needs it. The
    thinker is the same bits whenever and however loaded it is built (btpo_cli/cpu_kernels.py)."""
    log = root / "thinker-build.log"
    e = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    with log.open("w") as f:
        proc = subprocess.Popen(["nice", "-n", "19", sys.executable, "-m", "btpo_cli", "base-model"], stdout=f,
                                stderr=subprocess.STDOUT, env=e, cwd=REPO, process_group=0)
    return proc, log


@pytest.fixture
def fresh_thinker() -> None:
    """Wait for the session's own tiny-thinker build (:func:`_start_thinker_build`); a cache that already
    had it (``BTPO_TEST_CACHE``) was not fresh before this change either."""
    for proc, log in _THINKER:
        rc = proc.wait()
        assert rc == 0, f"btpo base-model failed ({rc}):\n{log.read_text()[-3000:]}"


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    tiny models only add thread contention on a busy 2-core runner. Restored after the module."""
    import torch  # heavy: imported on use

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data_builders.synthetic import build_synthetic

    d = tmp_path_factory.mktemp("data") / "synthetic"
    build_synthetic(d, n_train=96, n_test=24, seed=0)
    return d


DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
"""torch.distributed's variables: an in-process vLLM engine in an earlier test sets some of them in this
process, and a CLI child that inherits them believes it is one rank of a launched world (env://)."""


LOG_ENV = (*QUIET_ENV, "TQDM_DISABLE", "VLLM_LOGGING_STREAM", "VLLM_LOGGING_LEVEL")
"""Logging variables that btpo sets in its own process (``quiet_third_party``, the vLLM engine): in-process
tests set them in this process, and a CLI child must see them as the user's environment had them."""
USER_LOG_ENV = {k: os.environ[k] for k in LOG_ENV if k in os.environ}


def run_btpo(*args: str, env: dict[str, str] | None = None, check: bool = True,
             cwd: Path | None = None, timeout: float | None = 600) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter, as a user would (``timeout=None``: CI's own limit applies)."""
    e = {k: v for k, v in os.environ.items() if k not in DIST_ENV and k not in LOG_ENV}
    e.update(USER_LOG_ENV)
    e["COLUMNS"] = "200"
    e.update(env or {})
    if not e["COLUMNS"]:       # env={"COLUMNS": ""}: no width given, as in a plain pipe
        del e["COLUMNS"]
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-m", "btpo_cli", *args], capture_output=True, text=True, env=e,
                       cwd=cwd or REPO, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"btpo {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def full_and_resumed(args: list[str], root: Path, step: int) -> tuple[Path, Path]:
    """``btpo`` ``args`` twice: into ``root/full`` uninterrupted, and into ``root/killed`` killed
    right after optimizer step ``step`` (exit 17, no ``final/``) then ``--resume``d to the end."""
    full, killed = root / "full", root / "killed"
    run_btpo(*args, "--out", str(full))
    p = run_btpo(*args, "--out", str(killed), env={"BTPO_FAULT_AT_STEP": str(step)}, check=False)
    assert p.returncode == 17
    assert not (killed / "final").exists()
    run_btpo("train", "--out", str(killed), "--resume")
    return full, killed


TINY_BT = ["--set", "train.batch_size=8", "--set", "train.micro_batch_size=4", "--set", "optim.lr=1e-3",
           "--set", "optim.warmup_ratio=0"]


ONE_THREAD = {"OMP_NUM_THREADS": "1"}   # tiny models: threads only add contention on a busy 2-core runner
_ROLLOUT = ["--set", "rollout.batch_size=4", "--set", "train.batch_size=2", "--set", "train.micro_batch_size=1",
            "--set", "rollout.n=2", "--set", "rollout.max_new_tokens=8"]
JUDGE_TRAIN = {
    "bt": ["--max-steps", "3", "--set", "train.batch_size=8", "--set", "train.micro_batch_size=4"],
    "bt-prefilled": ["--max-steps", "2", "--set", "train.batch_size=4", "--set", "train.micro_batch_size=2",
                     "--set", "data.max_length=256", "--set", "prefilled.max_thought_tokens=6",
                     "--set", "prefilled.batch_size=64"],
    "gram": ["--max-steps", "2", "--set", "train.batch_size=4", "--set", "train.micro_batch_size=2",
             "--set", "data.max_length=256"],
    "grpo-pair": ["--max-steps", "2", *_ROLLOUT, "--set", "data.max_length=256"],
    "grpo-point": ["--max-steps", "2", *_ROLLOUT, "--set", "data.max_length=256"],
    "btpo": ["--max-steps", "2", *_ROLLOUT, "--set", "data.max_length=128"],
}
"""A few steps of each method on tiny-qwen2: judges for tests/judging/test_judge.py, test_serve.py, test_trl_reward.py."""


@pytest.fixture(scope="session")
def trained_judge(tmp_path_factory: pytest.TempPathFactory, synthetic_data: Path):
    """``trained_judge(method)`` → a run folder trained once per test session (JUDGE_TRAIN settings)."""
    root = tmp_path_factory.mktemp("judges")
    done: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in done:
            run = root / method
            run_btpo("train", "--method", method, "--model", "tiny-qwen2", "--data", str(synthetic_data), "--out",
                     str(run), *JUDGE_TRAIN[method], "--set", "optim.lr=1e-3", "--set", "optim.warmup_ratio=0",
                     env=ONE_THREAD)
            done[method] = run
        return done[method]

    return get
