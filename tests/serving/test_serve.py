"""``btpo serve`` through real HTTP on loopback: batched answers, 4xx for malformed requests, clean log.

The server is a ``btpo serve`` subprocess on 127.0.0.1 (a free port it picks and writes to a file);
every call below has a timeout and the server is stopped with SIGTERM at the end (killed if it
does not stop), so the test ends by itself.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ONE_THREAD, REPO

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
BODY_LIMIT = 16384


def _call(port: int, method: str, path: str, body: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(method, path, body=body, headers={"Connection": "close", **(headers or {})})
        r = conn.getresponse()
        data = r.read()
        try:
            return r.status, json.loads(data) if data else None
        except json.JSONDecodeError:
            return r.status, data.decode("utf-8", "replace")
    finally:
        conn.close()


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it has not stopped within a minute."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def _post(port: int, path: str, obj: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    return _call(port, "POST", path, json.dumps(obj).encode(), AUTH if headers is None else headers)


def _malformed(records: list[Any]) -> list[tuple[str, str, bytes, dict[str, str]]]:
    """500 bad requests: (method, path, body, headers), ten kinds × 50 variants."""
    rng = random.Random(0)
    out: list[tuple[str, str, bytes, dict[str, str]]] = []
    for i in range(50):
        rec = records[i % len(records)]
        q = rec["prompt"][-1]["content"]
        resp = rec["chosen"][0]["content"]
        j = lambda o: json.dumps(o).encode()  # noqa: E731
        out += [
            # bad JSON
            ("POST", "/v1/score", [b"{not json", b"", b"[1, 2", b"nul", b'{"prompt": "x",}'][i % 5] + b" " * i, AUTH),
            # wrong types
            ("POST", "/v1/score", j([{"prompt": i, "response": resp}, {"prompt": q, "responses": [1, 2]},
                                     {"prompt": q, "response": resp, "thoughts": "yes"},
                                     {"prompt": [{"role": "robot", "content": q}], "response": resp},
                                     {"prompt": q, "responses": {"0": resp}}][i % 5]), AUTH),
            ("POST", "/v1/compare", j([{"prompt": q, "a": i, "b": resp}, {"prompt": [q], "a": resp, "b": resp},
                                       {"prompt": q, "a": resp, "b": None}, [q, resp, resp],
                                       {"prompt": q, "a": resp, "b": resp, "aspect": 3}][i % 5]), AUTH),
            # huge bodies and too many items
            ("POST", "/v1/score", j({"prompt": q, "response": "x" * (BODY_LIMIT + 1000 * i)}), AUTH),
            ("POST", "/v1/score", j({"prompt": q, "responses": [resp] * (9 + i)}), AUTH),
            # missing fields / both / extra
            ("POST", "/v1/score", j([{}, {"prompt": q}, {"response": resp}, {"prompt": q, "response": resp,
                                     "responses": [resp]}, {"prompt": q, "response": resp, "extra": 1}][i % 5]), AUTH),
            ("POST", "/v1/compare", j([{"prompt": q, "a": resp}, {"a": resp, "b": resp}, {}][i % 3]), AUTH),
            # unicode garbage
            ("POST", "/v1/score", [b'{"prompt": "\xff\xfe", "response": "y"}', b'{"prompt": "\\ud800", "response": "y"}',
                                   bytes(rng.getrandbits(8) for _ in range(64)), b"\xc0\xaf\xed\xa0\x80",
                                   b'{"prompt": "x", "response": "\\udfff\\ud800"}'][i % 5], AUTH),
            # no token / wrong token
            ("POST", "/v1/score", j({"prompt": q, "response": resp}),
             [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Basic " + TOKEN}][i % 4]),
            # wrong method or path, a prompt that does not end with a user turn, nesting bombs
            [("GET", "/v1/score", b"", AUTH), ("POST", "/v2/score", j({"prompt": q, "response": resp}), AUTH),
             ("POST", "/v1/score", j({"prompt": [{"role": "assistant", "content": q}], "response": resp}), AUTH),
             ("POST", "/v1/score", b"[" * 5000 + b"]" * 5000, AUTH),
             ("POST", "/v1/score", j({"prompt": q, "responses": []}), AUTH)][i % 5],
        ]
    assert len(out) == 500
    return out


@pytest.mark.slow
def test_serve_batches_concurrent_requests_and_refuses_malformed_ones(trained_judge, synthetic_data: Path,
                                                                      tmp_path: Path) -> None:
    from btpo_cli import load_judge

    run = trained_judge("bt")
    records = [json.loads(x) for x in (synthetic_data / "test.jsonl").read_text().splitlines()]
    port_file, log_path = tmp_path / "port", tmp_path / "serve.log"
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "btpo_cli", "serve", "--judge", str(run), "--port", "0",
                                 "--port-file", str(port_file), "--token", TOKEN, "--max-wait-ms", "50",
                                 "--max-body-bytes", str(BODY_LIMIT), "--max-items", "8"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 300
        while not port_file.exists():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        port = int(port_file.read_text())
        assert _call(port, "GET", "/health")[0] == 200

        # 200 concurrent requests, answered with the scores of the Python API
        reqs = []
        for i in range(200):
            rec = records[i % len(records)]
            side = "chosen" if i % 2 else "rejected"
            text = rec[side][0]["content"] + ("" if i < 48 else f" ({i})")
            reqs.append({"prompt": rec["prompt"], "response": text} if i % 4 else
                        {"prompt": rec["prompt"], "responses": [text, rec["chosen"][0]["content"]]})
        with ThreadPoolExecutor(max_workers=100) as pool:
            answers = list(pool.map(lambda r: _post(port, "/v1/score", r), reqs))
        with load_judge(run, device="cpu") as judge:
            for req, (status, body) in zip(reqs, answers, strict=True):
                assert status == 200, body
                texts = [req["response"]] if "response" in req else req["responses"]
                want = [s.score for s in judge.score([req["prompt"]] * len(texts), texts)]
                assert body["scores"] == pytest.approx(want, abs=1e-5)
                assert body["best"] == max(range(len(want)), key=lambda k: (want[k], -k)) or \
                    abs(want[0] - want[-1]) < 1e-5
            status, body = _post(port, "/v1/compare", {"prompt": "What is 2 + 3?", "a": "5", "b": "6"})
            want = judge.compare("What is 2 + 3?", "5", "6")
            assert status == 200 and body["prob_a"] == pytest.approx(want.prob_a, abs=1e-6)
        stats = _call(port, "GET", "/health")[1]["stats"]
        assert stats["requests"] == 201 and stats["items"] == 150 + 2 * 50 + 1
        assert stats["batches"] < 200 and stats["forward_calls"] < 200     # batched: fewer forwards than requests
        print(f"\n200 concurrent requests → {stats['batches']} batches, {stats['forward_calls']} forward calls, "
              f"largest batch {stats['max_batch_items']} items")

        # 500 malformed requests: each a 4xx with a JSON error; the server keeps answering
        bad = _malformed(records)
        with ThreadPoolExecutor(max_workers=32) as pool:
            got = list(pool.map(lambda r: _call(port, *r), bad))
        for (method, path, body, _), (status, answer) in zip(bad, got, strict=True):
            assert 400 <= status < 500, (method, path, body[:80], status, answer)
            assert isinstance(answer, dict) and set(answer["error"]) == {"type", "message"}, answer
        kinds = {a["error"]["type"] for _, a in got}
        assert {"bad_json", "invalid_request", "too_large", "too_many_items", "unauthorized", "not_found",
                "method_not_allowed"} <= kinds
        status, body = _post(port, "/v1/score", reqs[1])
        assert status == 200 and body["scores"] == pytest.approx(answers[1][1]["scores"], abs=1e-5)
        assert _call(port, "GET", "/health")[1]["status"] == "ok"
    finally:
        stop_server(proc)
    log_text = log_path.read_text()
    assert proc.returncode in (0, -signal.SIGTERM), log_text[-2000:]    # uvicorn re-raises the signal it stopped on
    assert "Traceback" not in log_text and "Application shutdown complete" in log_text
    assert "serving the bt judge" in log_text and "127.0.0.1" in log_text
