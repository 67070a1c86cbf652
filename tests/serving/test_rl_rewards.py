"""RL frameworks' reward requests against ``btpo serve``: OpenRLHF's ``POST /get_reward`` and the batch
``POST /v1/rewards`` (verl's reward loop), with the exact request and response shapes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from btpo_cli.serving.rewards import split_query
from tests.conftest import ONE_THREAD, REPO
from tests.serving.test_serve import _call, _post, stop_server

HEADERS = {"Content-Type": "application/json"}


def chatml(*turns: tuple[str, str], end: str = "<|im_end|>") -> str:
    return "".join(f"<|im_start|>{r}\n{c}{end if k < len(turns) - 1 else ''}\n" for k, (r, c) in enumerate(turns))


def test_split_query_reads_the_last_assistant_turn() -> None:
    q = chatml(("system", "Be brief."), ("user", "What is 2 + 3?"), ("assistant", "5")) + "<|im_end|>"
    assert split_query(q) == ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}],
                              "5")
    llama = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi?<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>")
    assert split_query(llama) == ([{"role": "user", "content": "Hi?"}], "Hello!")
    assert split_query("Q: 2+3?\nA: 5</s>", "Q: 2+3?\nA:") == ([{"role": "user", "content": "Q: 2+3?\nA:"}], "5")
    assert "does not start with its prompt" in split_query("plain text", None)
    assert "no assistant turn" in split_query(chatml(("user", "hi")))


@pytest.mark.slow
def test_openrlhf_get_reward_and_batch_rewards_on_btpo_serve(trained_judge, tmp_path: Path) -> None:
    from btpo_cli import load_judge

    run = trained_judge("bt")
    port_file = tmp_path / "port"
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "btpo_cli", "serve", "--judge", str(run), "--port", "0",
                                 "--port-file", str(port_file)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=REPO)
    try:
        deadline = time.monotonic() + 300
        while not port_file.exists():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        port = int(port_file.read_text())
        prompts = ["<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"] * 2   # as OpenRLHF sends
        queries = [chatml(("user", "What is 2 + 3?"), ("assistant", "5")) + "<|im_end|>",
                   chatml(("user", "What is 2 + 3?"), ("assistant", "6")) + "<|im_end|>",
                   "no markup at all"]
        body = {"query": queries, "prompts": [*prompts, "something else"], "labels": ["5", "5", "x"]}
        status, got = _post(port, "/get_reward", body, HEADERS)
        assert status == 200, got
        assert set(got) >= {"rewards", "scores", "extra_logs"}
        assert len(got["rewards"]) == len(queries) == len(got["extra_logs"]["btpo_error"])
        assert got["extra_logs"]["btpo_error"] == [0.0, 0.0, 1.0] and got["rewards"][2] == 0.0
        with load_judge(run, device="cpu") as judge:
            want = [s.score for s in judge.score(["What is 2 + 3?"] * 2, ["5", "6"])]
        assert got["rewards"][:2] == pytest.approx(want, abs=1e-5)
        status, batch = _post(port, "/v1/rewards", {"items": [{"prompt": "What is 2 + 3?", "response": "5"},
                                                              {"prompt": [{"role": "user", "content": "What is 2 + 3?"}],
                                                               "response": "6"}]}, HEADERS)
        assert status == 200 and batch["rewards"] == pytest.approx(want, abs=1e-5) and batch["errors"] == [None, None]
        status, bad = _post(port, "/get_reward", {"query": "not a list"}, HEADERS)
        assert status == 422 and bad["error"]["type"] == "invalid_request"
        assert _call(port, "GET", "/health")[1]["stats"]["unsplittable"] == 1
    finally:
        stop_server(proc)
