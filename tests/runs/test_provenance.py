"""btpo_cli/runs/provenance.py without training: the weights digest kept beside the weights, data digests,
and the staleness rule for evals with and without provenance."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from btpo_cli.runs import provenance as prov
from btpo_cli.runs.provenance import MODEL_CHANGED, WEIGHTS_FILE, data_digest, staleness, weights_digest


def _model(d: Path, weights: bytes = b"w" * 100) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.safetensors").write_bytes(weights)
    (d / "btpo.json").write_text(json.dumps({"method": "bt", "eval": {}}))
    return d


def test_weights_are_hashed_once_and_again_only_when_they_change(tmp_path: Path, monkeypatch) -> None:
    d = _model(tmp_path / "final")
    first = weights_digest(d)                 # an older folder: computed once, stored beside the weights
    assert first is not None and (d / WEIGHTS_FILE).exists() and first["step"] is None
    reads = []
    real = prov.sha256_path
    monkeypatch.setattr(prov, "sha256_path", lambda p: reads.append(p) or real(p))
    prov._MEMO.clear()
    assert weights_digest(d)["sha256"] == first["sha256"] and reads == []     # read from the sidecar
    (d / "model.safetensors").write_bytes(b"v" * 101)
    assert weights_digest(d)["sha256"] != first["sha256"] and len(reads) == 1
    assert weights_digest(tmp_path / "nothing") is None


def test_data_digest_of_a_folder_split_a_file_and_a_hub_id(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "test.jsonl").write_text("{}\n")
    d = data_digest(tmp_path / "ds", "test")
    assert d["file"] == str((tmp_path / "ds" / "test.jsonl").resolve()) and len(d["sha256"]) == 64
    assert data_digest(tmp_path / "ds" / "test.jsonl", "train")["sha256"] == d["sha256"]
    hub = data_digest("someone/some-dataset", "test")
    assert hub["hub_id"] == "someone/some-dataset" and "revision" in hub


def _eval(root: Path, summary: dict) -> Path:
    (root / "eval").mkdir(parents=True, exist_ok=True)
    p = root / "eval" / "hh.json"
    p.write_text(json.dumps(summary))
    return p


def test_an_eval_without_provenance_is_judged_by_the_models_btpo_json(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _model(run / "final")
    s = {"dataset": "hh", "split": "test", "n": 10, "accuracy": 0.6, "raw_accuracy": 0.6, "which": "final"}
    path = _eval(run, s)
    assert staleness(s, path)[0] == MODEL_CHANGED              # btpo.json's eval no longer holds it (a resume)
    meta = json.loads((run / "final" / "btpo.json").read_text())
    meta["eval"]["hh/test"] = {"n": 10, "accuracy": 0.6, "raw_accuracy": 0.6}
    (run / "final" / "btpo.json").write_text(json.dumps(meta))
    reason, detail = staleness(s, path)
    assert reason is None and "unknown provenance" in detail
    assert staleness({**s, "as_is": True}, path)[0] is None


def test_a_deleted_model_leaves_its_results_unless_the_run_started_again(tmp_path: Path) -> None:
    run = tmp_path / "run"
    s = {"dataset": "hh", "split": "test", "n": 10, "accuracy": 0.6, "raw_accuracy": 0.6, "which": "final"}
    path = _eval(run, s)
    assert staleness(s, path)[0] is None                       # final/ deleted to save space
    past = time.time() - 3600
    os.utime(path, (past, past))
    (run / "env.json").write_text(json.dumps({"starts": [{"time": time.strftime(prov.TIME_FORMAT)}]}))
    assert staleness(s, path)[0] == MODEL_CHANGED              # --overwrite started it again after the eval
