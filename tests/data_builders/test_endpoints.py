"""--generator-url / --judge-url against a stub OpenAI-compatible server on 127.0.0.1 (no model):
retries with exponential backoff, timeouts, unparseable replies, counted skips in the manifest, and
a re-run that asks the server only what it has not answered."""

from __future__ import annotations

import csv
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from btpo_cli.errors import BtpoError
from data_builders.generated import EndpointDown, EndpointError, GenOptions, OpenAIClient, ReplyCache
from tests.conftest import run_btpo

GSM8K = Path(__file__).resolve().parents[1] / "data" / "gsm8k" / "test.jsonl"


class Stub:
    """What the stub server answers and what it saw. A request whose text holds a marker misbehaves
    while ``healthy`` is False: ``GEN500`` (generator requests) and ``JUDGE500`` (judge requests) get
    HTTP 500, ``SLOW`` judge requests no reply within the client's timeout, ``GARBAGE`` judge requests
    a body that is not JSON; ``FLAKY`` requests get one 500, then a reply."""

    def __init__(self) -> None:
        self.healthy = False
        self.seen: list[dict[str, Any]] = []
        self.flaky_done: set[str] = set()
        self.golds: dict[str, str] = {}
        self.lock = threading.Lock()

    def reply(self, path: str, body: dict[str, Any]) -> tuple[int, bytes, float]:
        is_judge = path.endswith("/chat/completions") and body.get("max_tokens") == 8 and body.get("temperature") == 0
        text = json.dumps(body.get("messages") or body.get("prompt"))
        with self.lock:
            self.seen.append({"judge": is_judge, "text": text, "path": path})
        if "FLAKY" in text and text not in self.flaky_done:
            self.flaky_done.add(text)
            return 500, b"try again", 0.0
        if not self.healthy:
            if ("GEN500" in text and not is_judge) or ("JUDGE500" in text and is_judge):
                return 500, b"internal error", 0.0
            if "SLOW" in text and is_judge:
                return 200, b"{}", 1.5
            if "GARBAGE" in text and is_judge:
                return 200, b"<html>not json", 0.0
        n = int(body.get("n", 1))
        if is_judge:   # "Yes" iff the judged response names sample 0
            resp = body["messages"][0]["content"].split("Response to the last user turn:\n", 1)[1]
            choices = [{"index": 0, "message": {"content": "Yes" if resp.startswith("Answer 0") else "No"},
                        "finish_reason": "stop"}]
        elif path.endswith("/chat/completions"):
            choices = [{"index": j, "message": {"content": f"Answer {j}."}, "finish_reason": "stop"} for j in range(n)]
        else:          # /completions, a math prompt: even samples right, odd ones wrong
            gold = next((g for q, g in self.golds.items() if q in body["prompt"]), "0")
            choices = [{"index": j, "text": f"Step.\nThe answer is: {gold if j % 2 == 0 else gold + '1'}",
                        "finish_reason": "stop"} for j in range(n)]
        return 200, json.dumps({"choices": choices}).encode(), 0.0


@pytest.fixture(scope="module")
def stub() -> Iterator[tuple[Stub, str]]:
    state = Stub()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            code, data, delay = state.reply(self.path, body)
            if delay:
                time.sleep(delay)
            try:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:  # the client gave up (timeout)
                pass

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------- the client


def test_client_retries_with_exponential_backoff_then_names_the_url(stub: tuple[Stub, str]) -> None:
    state, url = stub
    state.healthy = False
    sleeps: list[float] = []
    c = OpenAIClient(url, "m", retries=3, backoff=0.5, sleep=sleeps.append)
    with pytest.raises(EndpointError, match=r"/v1/chat/completions: HTTP 500 .* after 4 tries"):
        c.post("/chat/completions", {"messages": [{"role": "user", "content": "JUDGE500"}], "temperature": 0,
                                     "max_tokens": 8}, lambda d: d)
    assert sleeps == [0.5, 1.0, 2.0] and c.calls == 4
    # one 500, then an answer: the retry recovers
    sleeps.clear()
    got = c.post("/chat/completions", {"messages": [{"role": "user", "content": "FLAKY"}], "n": 2},
                 lambda d: len(d["choices"]))
    assert got == 2 and sleeps == [0.5]


def test_client_timeout_and_unparseable_reply_are_named(stub: tuple[Stub, str]) -> None:
    state, url = stub
    state.healthy = False
    judge = {"temperature": 0, "max_tokens": 8}
    c = OpenAIClient(url, "m", retries=1, backoff=0.0, timeout=0.3)
    with pytest.raises(EndpointError, match=r"no reply within 0\.3s .* after 2 tries"):
        c.post("/chat/completions", {"messages": [{"role": "user", "content": "SLOW"}], **judge}, lambda d: d)
    with pytest.raises(EndpointError, match=r"unparseable reply"):
        c.post("/chat/completions", {"messages": [{"role": "user", "content": "GARBAGE"}], **judge},
               lambda d: d["choices"])


def test_client_dead_port_stops_at_once_and_cache_answers_without_asking(tmp_path: Path,
                                                                         stub: tuple[Stub, str]) -> None:
    sleeps: list[float] = []
    with pytest.raises(EndpointDown, match=r"http://127\.0\.0\.1:9/v1/completions .*is the server running"):
        OpenAIClient("http://127.0.0.1:9/v1", "m", retries=3, sleep=sleeps.append).post("/completions", {}, str)
    assert sleeps == []      # connection refused: no retries, the build stops with one line
    state, url = stub
    state.healthy = True
    body = {"messages": [{"role": "user", "content": "cache me"}], "n": 1}
    c = OpenAIClient(url, "m", cache=ReplyCache(tmp_path / "http.jsonl"))
    first = c.post("/chat/completions", body, lambda d: d["choices"][0]["message"]["content"])
    before = len(state.seen)
    c2 = OpenAIClient(url, "m", cache=ReplyCache(tmp_path / "http.jsonl"))
    assert c2.post("/chat/completions", body, lambda d: d["choices"][0]["message"]["content"]) == first
    assert len(state.seen) == before and c2.calls == 0 and c2.cached == 1


# ----------------------------------------------------------------------------- build-data if


def _advancedif(path: Path, users: list[str]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["conversation_history", "benchmark_name", "prompt_metadata"])
        for u in users:
            convo = [{"role": "user", "content": u}]
            w.writerow([json.dumps(convo), "if_complex_single_turn_oss",
                        json.dumps({"rubrics": json.dumps(["Is it answer 0?", "Is it short?"])})])
    return path


def test_if_through_urls_counts_failures_and_rerun_asks_only_those(tmp_path: Path, stub: tuple[Stub, str]) -> None:
    state, url = stub
    users = ["Say hi.", "Say GEN500.", "Say JUDGE500.", "Say SLOW.", "Say GARBAGE.", "Say FLAKY hello."]
    src = _advancedif(tmp_path / "if.csv", users)
    out = tmp_path / "if"
    args = ["build-data", "if", "--out", str(out), "--source", f"advancedif={src}", "--generator", "gen",
            "--generator-url", url, "--judge", "jdg", "--judge-url", url, "--n-samples", "2", "--batch-size", "3",
            "--retries", "2", "--timeout", "0.5", "--backoff", "0.01", "--test-fraction", "0"]
    state.healthy, state.seen = False, []
    p = run_btpo(*args)
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    f = m["failed"]
    assert f["total"] == 4 and f["what"] == "prompts"
    reasons = " | ".join(f["reasons"])
    for why in ("generator endpoint", "HTTP 500", "judge endpoint", "no reply within 0.5s", "unparseable reply"):
        assert why in reasons, reasons
    assert m["prompts"] == 6 and m["pairs"] + m["ties"] + f["total"] == 6
    assert m["pairs"] == 2 and m["counts"]["train"] == 2          # "Say hi." and the flaky one, recovered
    assert m["judge"]["url"] == url and m["judge"]["model"] == "jdg"
    assert m["generator_endpoint"]["url"] == url and m["generator"]["generator"] == "gen"
    assert "4 prompts left out" in p.stderr and "Traceback" not in p.stderr
    gen_once = {s["text"] for s in state.seen if not s["judge"]}
    assert len(gen_once) == 6
    # the server is fixed: the re-run asks for the 4 failed prompts' missing answers, nothing else
    state.healthy, state.seen = True, []
    run_btpo(*args)
    m2 = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert m2["failed"]["total"] == 0 and m2["pairs"] + m2["ties"] == 6 and m2["pairs"] == 6
    gen = [s for s in state.seen if not s["judge"]]
    judged = [s for s in state.seen if s["judge"]]
    assert len(gen) == 1 and "GEN500" in gen[0]["text"]
    # GEN500: 2 samples x 2 rubrics; JUDGE500, SLOW, GARBAGE: all 4 of their judgments failed
    assert len(judged) == 4 * 4
    for s in judged:
        assert any(k in s["text"] for k in ("GEN500", "JUDGE500", "SLOW", "GARBAGE")), s["text"][:200]


def test_every_request_failing_is_one_line_error(tmp_path: Path, stub: tuple[Stub, str]) -> None:
    state, url = stub
    state.healthy = False
    src = _advancedif(tmp_path / "if.csv", ["GEN500 one", "GEN500 two"])
    p = run_btpo("build-data", "if", "--out", str(tmp_path / "o"), "--source", f"advancedif={src}", "--generator",
                 "g", "--generator-url", url, "--judge-url", url, "--retries", "0", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "if: sampling: every request failed (2)" in p.stderr and url in p.stderr
    p = run_btpo("build-data", "if", "--out", str(tmp_path / "o"), "--source", f"advancedif={src}", "--generator",
                 "g", "--generator-url", "http://127.0.0.1:9/v1", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr and "http://127.0.0.1:9/v1/chat/completions" in p.stderr
    p = run_btpo("build-data", "if", "--out", str(tmp_path / "o"), "--source", f"advancedif={src}", "--generator",
                 "g", "--generator-url", "localhost:8000", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr and "--generator-url 'localhost:8000'" in p.stderr


# ----------------------------------------------------------------------------- build-data math


def test_math_gsm8k_only_through_url(tmp_path: Path, stub: tuple[Stub, str]) -> None:
    from data_builders.math_builder import build_math

    state, url = stub
    state.healthy = True
    rows = [json.loads(line) for line in GSM8K.read_text(encoding="utf-8").splitlines()[:4]]
    state.golds = {r["question"].strip(): r["answer"].rsplit("####", 1)[1].strip().replace(",", "") for r in rows}
    out = tmp_path / "m"
    m = build_math(out, {"gsm8k": str(GSM8K)}, generator="g", generator_url=url, n_samples=4, batch_size=2,
                   limit=4, n_test=0, backoff=0.0)
    assert list(m["sources"]) == ["gsm8k"]                      # MetaMathQA was not asked for
    assert m["splits_without_source"] == {"train": ["metamathqa"]}
    assert m["counts"] == {"train": 0, "test": 4} and m["questions"]["gsm8k"]["pairs"] == 4
    assert m["grading"]["correct"] == m["grading"]["incorrect"] == 8
    rec = json.loads((out / "test.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert rec["source"] == "gsm8k" and rec["meta"]["chosen_answer"] == rec["meta"]["gold"]
    with pytest.raises(BtpoError, match="--retries"):
        build_math(out, {"gsm8k": str(GSM8K)}, generator="g", generator_url=url, retries=-1)


def test_default_timeout_grows_with_what_a_batch_asks_for() -> None:
    """The generator's default timeout covers a batch at 20 tokens/s (a CPU server is not timed out and
    asked again mid-generation); the judge keeps 120 s; an explicit --timeout wins for both."""
    o = GenOptions(generator="g", n_samples=16, max_new_tokens=256, batch_size=8, n_train=0, n_test=0,
                   generator_url="http://127.0.0.1:1/v1")
    assert o.timeout_for("judge") == 120.0
    assert o.timeout_for("generator") == 120.0 + 8 * 16 * 256 / 20
    assert o.describe_generator()["timeout"] == o.timeout_for("generator")
    assert o.client("http://127.0.0.1:1/v1", "g", "generator", None).timeout == o.timeout_for("generator")
    fixed = GenOptions.with_defaults({**o.__dict__}, {"timeout": 5.0})
    assert fixed.timeout_for("generator") == fixed.timeout_for("judge") == 5.0
