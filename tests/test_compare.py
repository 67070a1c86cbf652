"""``btpo compare``: the results table from fake run folders (no training)."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import pytest

from btpo_cli.compare import build_table, collect, plot, to_csv, to_json, to_markdown
from btpo_cli.config import Config, dump_yaml
from btpo_cli.judging.protocol import EVAL_VERSION
from tests.conftest import run_btpo


def fake_run(root: Path, name: str, model: str, method: str, accs: dict[str, float], seed: int = 0,
             version: str = EVAL_VERSION, n: int = 200, metrics: bool = True) -> Path:
    """A run folder with config.yaml, metrics.jsonl and eval/<dataset>.json; ``accs`` are raw accuracies."""
    d = root / name
    (d / "eval").mkdir(parents=True)
    cfg = Config(method=method, name=name, out=str(d))
    cfg.model.name = model
    cfg.train.seed = seed
    (d / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
    for ds, raw in accs.items():
        s = {"eval_version": version, "run": name, "method": method, "model": model, "dataset": ds,
             "data_path": f"data/{ds}", "split": "test", "protocol": "pointwise", "n": n,
             "accuracy": max(raw, 0.5), "raw_accuracy": raw, "clipped": raw < 0.5, "tie_rate": 0.01,
             "format_error_rate": 0.0 if raw >= 0.5 else 0.3}
        (d / "eval" / f"{ds}.json").write_text(json.dumps(s), encoding="utf-8")
    if metrics:
        with open(d / "metrics.jsonl", "w", encoding="utf-8") as f:
            f.write(json.dumps({"step": 0, "data/train_pairs": 64}) + "\n")
            for step in range(1, 9):
                row: dict[str, Any] = {"step": step, "train/loss": 0.7 - 0.02 * step - 0.01 * seed}
                if method == "btpo":
                    row["btpo/omega_mean"] = 0.5 - 0.02 * step
                f.write(json.dumps(row) + "\n")
    return d


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    # backbone A: bt, gram, btpo (3 seeds), on hh + math; grpo-point only on hh (not in avg)
    fake_run(root, "a-bt", "model-a", "bt", {"hh": 0.60, "math": 0.70})
    fake_run(root, "a-gram", "model-a", "gram", {"hh": 0.65, "math": 0.40})   # math clipped (raw 40)
    for seed, (hh, math_) in enumerate([(0.70, 0.80), (0.72, 0.84), (0.74, 0.82)]):
        fake_run(root, f"a-btpo-s{seed}", "model-a", "btpo", {"hh": hh, "math": math_}, seed=seed)
    fake_run(root, "a-grpo-point", "model-a", "grpo-point", {"hh": 0.90})
    # backbone B: no BT row → no deltas; btpo best on hh
    fake_run(root, "b-gram", "model-b", "gram", {"hh": 0.55})
    fake_run(root, "b-btpo", "model-b", "btpo", {"hh": 0.58})
    # left out, and said so
    fake_run(root, "a-old", "model-a", "bt", {"hh": 0.99}, version="btpo-eval/0")
    (root / "a-untested").mkdir()
    (root / "a-untested" / "config.yaml").write_text(dump_yaml(Config()), encoding="utf-8")
    return root


def row(table: Any, model: str, method: str) -> Any:
    return next(r for r in table.rows if (r.model, r.method) == (model, method))


def test_table_numbers_order_best_delta_aggregation(runs: Path) -> None:
    c = collect([runs])
    assert c.datasets == ["hh", "math"]
    assert [r.name for r in c.runs if r.name.startswith("a-old")] == []
    assert any("a-old" in s and "eval_version" in s for s in c.skipped)
    assert sorted(Path(m).name for m in c.missing_eval) == ["a-old", "a-untested"]
    t = build_table(c)
    assert [(r.model, r.method) for r in t.rows] == [
        ("model-a", "bt"), ("model-a", "gram"), ("model-a", "grpo-point"), ("model-a", "btpo"),
        ("model-b", "gram"), ("model-b", "btpo")]

    bt, gram, gp, btpo = (row(t, "model-a", m) for m in ("bt", "gram", "grpo-point", "btpo"))
    assert bt.cells["hh"].acc == pytest.approx(60.0) and bt.cells["hh"].k == 1 and bt.cells["hh"].acc_std is None
    # clipped: shown 50, raw 40 kept
    assert gram.cells["math"].acc == pytest.approx(50.0) and gram.cells["math"].raw == pytest.approx(40.0)
    assert gram.cells["math"].clipped
    # seeds: mean ± sample std, n = 3
    hh = btpo.cells["hh"]
    assert hh.k == 3 and hh.acc == pytest.approx(72.0) and hh.acc_std == pytest.approx(statistics.stdev([70, 72, 74]))
    assert btpo.cells["math"].acc == pytest.approx(82.0) and btpo.cells["math"].acc_std == pytest.approx(2.0)
    assert hh.runs == ["a-btpo-s0", "a-btpo-s1", "a-btpo-s2"]
    # deltas to BT of the same backbone and dataset
    assert bt.cells["hh"].delta_bt is None
    assert btpo.cells["hh"].delta_bt == pytest.approx(12.0)
    assert gram.cells["math"].delta_bt == pytest.approx(-20.0)   # clipped 50 − 70
    assert gp.cells["hh"].delta_bt == pytest.approx(30.0)
    # avg only over datasets every row of the block has: model-a → hh only (grpo-point lacks math)
    assert t.avg_datasets == {"model-a": ["hh"], "model-b": ["hh"]}
    assert btpo.avg is not None and btpo.avg.acc == pytest.approx(72.0)
    # best per column within each block
    assert gp.cells["hh"].best and not btpo.cells["hh"].best and not bt.cells["hh"].best
    assert btpo.cells["math"].best and not bt.cells["math"].best
    assert gp.avg is not None and gp.avg.best
    b_btpo, b_gram = row(t, "model-b", "btpo"), row(t, "model-b", "gram")
    assert b_btpo.cells["hh"].best and not b_gram.cells["hh"].best
    assert b_btpo.cells["hh"].delta_bt is None   # no BT row for model-b


def test_raw_view_ranks_by_raw(runs: Path) -> None:
    t = build_table(collect([runs]), show="raw")
    gram = row(t, "model-a", "gram")
    assert gram.cells["math"].shown("raw") == pytest.approx(40.0)
    assert gram.cells["math"].delta_bt == pytest.approx(-30.0)


def test_avg_covers_all_datasets_when_complete(tmp_path: Path) -> None:
    fake_run(tmp_path, "bt", "m", "bt", {"hh": 0.60, "math": 0.70})
    fake_run(tmp_path, "btpo", "m", "btpo", {"hh": 0.70, "math": 0.90})
    t = build_table(collect([tmp_path / "bt", tmp_path / "btpo", tmp_path / "bt"]))   # duplicate ignored
    assert len(t.rows[0].runs) == 1
    assert t.avg_datasets == {"m": ["hh", "math"]}
    assert t.rows[1].avg is not None and t.rows[1].avg.acc == pytest.approx(80.0)
    assert t.rows[1].avg.delta_bt == pytest.approx(15.0) and t.rows[1].avg.best


def test_formats_parse(runs: Path) -> None:
    t = build_table(collect([runs]))
    rows = list(csv.DictReader(io.StringIO(to_csv(t))))
    assert len(rows) == 6
    a_btpo = next(r for r in rows if r["model"] == "model-a" and r["method"] == "btpo")
    assert float(a_btpo["hh"]) == 72.0 and a_btpo["hh_runs"] == "3" and float(a_btpo["hh_delta_bt"]) == 12.0
    assert math.isclose(float(a_btpo["hh_std"]), 2.0) and a_btpo["hh_n"] == "200" and a_btpo["math_best"] == "1"
    assert a_btpo["run"] == "a-btpo-s0;a-btpo-s1;a-btpo-s2"
    a_gram = next(r for r in rows if r["model"] == "model-a" and r["method"] == "gram")
    assert a_gram["math"] == "50.0" and a_gram["math_raw"] == "40.0" and a_gram["math_clipped"] == "1"
    a_gp = next(r for r in rows if r["method"] == "grpo-point")
    assert a_gp["math"] == "" and a_gp["avg_best"] == "1"

    doc = json.loads(to_json(t))
    assert doc["eval_version"] == EVAL_VERSION and doc["datasets"] == ["hh", "math"]
    j = next(r for r in doc["rows"] if r["model"] == "model-a" and r["method"] == "btpo")
    assert j["cells"]["hh"]["value"] == 72.0 and j["cells"]["hh"]["n_runs"] == 3
    assert j["cells"]["hh"]["values"] == [70.0, 72.0, 74.0] and j["cells"]["math"]["best"] is True
    assert any("a-old" in s for s in doc["skipped"]) and any("a-untested" in m for m in doc["missing_eval"])

    md = to_markdown(t)
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert lines[0] == "| model | method | hh | math | avg |"
    assert all(ln.count("|") == 6 for ln in lines)
    btpo_line = next(ln for ln in lines if "model-a | btpo" in ln)
    assert "72.0 ± 2.0 n=3 (+12.0)" in btpo_line and "**82.0** ± 2.0 n=3 (+12.0)" in btpo_line
    gram_line = next(ln for ln in lines if "model-a | gram" in ln)
    assert "50.0 [40.0] (-20.0)" in gram_line
    assert "**90.0** (+30.0)" in next(ln for ln in lines if "grpo-point" in ln)
    assert "avg for model-a over: hh" in md


def test_plot_writes_png(runs: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = plot(build_table(collect([runs])), tmp_path / "fig" / "cmp.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_cli_compare(runs: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "cmp.png"
    p = run_btpo("compare", str(runs), "--plot", str(png))
    assert "model-a" in p.stdout and "72.0 ± 2.0 n=3 (+12.0)" in p.stdout
    assert "82.0* ± 2.0 n=3 (+12.0)" in p.stdout   # best marker
    assert "not evaluated" in p.stderr and "a-untested" in p.stderr
    assert "skipped" in p.stderr and "eval_version 'btpo-eval/0'" in p.stderr
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
    js = json.loads(run_btpo("compare", str(runs), "--format", "json").stdout)
    assert len(js["rows"]) == 6
    rows = list(csv.DictReader(io.StringIO(run_btpo("compare", str(runs), "-f", "csv", "--show", "raw").stdout)))
    assert next(r for r in rows if r["method"] == "gram" and r["model"] == "model-a")["math"] == "40.0"
    assert run_btpo("compare", str(runs), "--format", "markdown").stdout.startswith("| model | method |")
    p = run_btpo("compare", str(runs / "a-untested"), check=False)
    assert p.returncode == 1 and "not evaluated" in p.stderr and "Traceback" not in p.stderr
    p = run_btpo("compare", str(runs), "--format", "xml", check=False)
    assert p.returncode == 2


def test_plot_accepts_collected_and_missing_matplotlib_is_clear(runs: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    assert plot(collect([runs]), tmp_path / "c.png").stat().st_size > 0
    from btpo_cli.compare import PlotDependencyMissing
    from btpo_cli.errors import BtpoError

    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib → ImportError
    with pytest.raises(PlotDependencyMissing, match=r"pip install 'btpo\[plot\]'") as e:
        plot(collect([runs]), tmp_path / "d.png")
    assert isinstance(e.value, BtpoError) and isinstance(e.value, ImportError)


# ----------------------------------------------------------------------------- bad eval files, skip counts

BAD_SUMMARIES = [
    ({"accuracy": "abc"}, "field 'accuracy'"),
    ({"raw_accuracy": None}, "field 'raw_accuracy'"),
    ({"accuracy": 1.7}, "field 'accuracy'"),
    ({"accuracy": float("nan")}, "field 'accuracy'"),
    ({"n": "many"}, "field 'n'"),
    ({"tie_rate": "x"}, "field 'tie_rate'"),
    ({"format_error_rate": [1]}, "field 'format_error_rate'"),
    ({"clipped": "no"}, "field 'clipped'"),
    ({"dataset": ["hh"]}, "field 'dataset'"),
    ({"model": {"a": 1}}, "field 'model'"),
]


@pytest.mark.parametrize("bad,named", BAD_SUMMARIES)
def test_a_bad_eval_json_is_skipped_by_name_and_the_table_stays(runs: Path, bad: dict, named: str) -> None:
    f = runs / "a-gram" / "eval" / "hh.json"
    s = json.loads(f.read_text())
    s.update(bad)
    f.write_text(json.dumps(s))
    c = collect([runs])
    (msg,) = [m for m in c.skipped if m.startswith(str(f))]
    assert named in msg and "\n" not in msg
    t = build_table(c)
    assert row(t, "model-a", "gram").cells.keys() == {"math"}           # its other dataset is kept
    assert row(t, "model-a", "bt").cells["hh"].acc == pytest.approx(60.0)


def test_cli_compare_with_a_bad_eval_json(runs: Path) -> None:
    f = runs / "a-gram" / "eval" / "hh.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "accuracy": "abc"}))
    (runs / "a-bt" / "eval" / "math.json").write_bytes(b"\xff\xfe not json")
    p = run_btpo("compare", str(runs), "--format", "csv")
    assert p.returncode == 0 and "Traceback" not in p.stderr
    assert f"skipped: {f}: field 'accuracy'" in p.stderr.replace("\n", " ")
    assert "model-a,btpo" in p.stdout


def test_show_skips(runs: Path) -> None:
    from btpo_cli.compare import collect_skips, skips_rows

    (runs / "a-bt" / "data_skips.json").write_text(json.dumps({"train": {"data": "data/hh", "records": 90, "skipped": {
        "total": 3, "by_reason": {"invalid JSON (Expecting value)": 2, "rejected: identical to chosen": 1},
        "where": {"invalid JSON (Expecting value)": ["data/hh/train.jsonl:4", "data/hh/train.jsonl:9"],
                  "rejected: identical to chosen": ["data/hh/train.jsonl:7"]}}}}))
    f = runs / "a-bt" / "eval" / "hh.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "data_skips": {
        "records": 199, "total": 1, "by_reason": {"id: duplicate of an earlier record's id": 1},
        "where": {"id: duplicate of an earlier record's id": ["data/hh/test.jsonl:12"]}}}))
    (runs / "b-gram" / "data_skips.json").write_text("{not json")
    rows, problems = collect_skips([runs])
    mine = [r for r in rows if r["run"] == "a-bt"]
    assert {(r["stage"], r["reason"], r["count"], r["where"]) for r in mine} == {
        ("train", "invalid JSON (Expecting value)", 2, "data/hh/train.jsonl:4, data/hh/train.jsonl:9"),
        ("train", "rejected: identical to chosen", 1, "data/hh/train.jsonl:7"),
        ("eval hh/test", "id: duplicate of an earlier record's id", 1, "data/hh/test.jsonl:12")}
    assert any(p.startswith(str(runs / "b-gram" / "data_skips.json")) for p in problems)
    assert skips_rows(rows)[0] == ["a-bt", "train", "data/hh", "90", "3", "invalid JSON (Expecting value)", "2",
                                   "data/hh/train.jsonl:4, data/hh/train.jsonl:9"]
    p = run_btpo("compare", str(runs), "--show", "skips", "--format", "csv")
    lines = p.stdout.splitlines()
    assert lines[0] == "run,stage,data,records,skipped,reason,count,where"
    assert any(ln.startswith("a-bt,train,data/hh,90,3,invalid JSON (Expecting value),2,") for ln in lines)
    assert not any(ln.startswith("a-gram,") for ln in lines)
    err = p.stderr.replace("\n", " ")
    assert f"no skip report: {runs / 'a-gram'}" in err and str(runs / "b-gram" / "data_skips.json") in err
    assert "Traceback" not in p.stderr


def _set_settings(run_dir: Path, **settings: Any) -> None:
    for f in (run_dir / "eval").glob("*.json"):
        s = json.loads(f.read_text())
        s["eval_settings"] = settings
        f.write_text(json.dumps(s))


def test_rows_whose_eval_settings_differ_are_warned_about_and_marked(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    same = {"engine": "hf", "thought_budget": 64, "samples": 0, "yes_no_normalize": False}
    _set_settings(fake_run(root, "a-bt", "model-a", "bt", {"hh": 0.60}))                   # BT: no generative settings
    _set_settings(fake_run(root, "a-btpo", "model-a", "btpo", {"hh": 0.70}), **same)
    _set_settings(fake_run(root, "a-gram", "model-a", "gram", {"hh": 0.65}), engine="hf", thought_budget=64)
    _set_settings(fake_run(root, "b-btpo", "model-b", "btpo", {"hh": 0.70}), **same)    # other block: not compared
    t = build_table(collect([root]))
    assert t.warnings == [] and not any(r.settings_differ for r in t.rows)

    base = fake_run(root, "a-btpo-base", "model-a", "btpo", {"hh": 0.55})
    for f in (base / "eval").glob("*.json"):
        s = json.loads(f.read_text())
        s["tag"] = "base"
        f.write_text(json.dumps(s))
    _set_settings(base, **{**same, "thought_budget": 32, "yes_no_normalize": True})
    t = build_table(collect([root]))
    marked = {(r.model, r.method): r.settings_differ for r in t.rows if r.settings_differ}
    assert marked == {("model-a", "btpo"): ["thought_budget", "yes_no_normalize"],
                      ("model-a", "gram"): ["thought_budget"],
                      ("model-a", "btpo (base)"): ["thought_budget", "yes_no_normalize"]}
    assert len(t.warnings) == 2
    fake_run(root, "a-gram-n50", "model-a", "gram", {"hh": 0.65}, n=50)     # another size, another warning
    w = build_table(collect([root])).warnings
    assert any("model-a/hh: rows were evaluated on different numbers of pairs" in x and "btpo (base): 200" in x
               for x in w)
    assert "model-a: eval setting 'thought_budget' differs" in t.warnings[0]
    assert "32 (btpo (base))" in t.warnings[0] and "64 (gram, btpo)" in t.warnings[0]
    assert "'yes_no_normalize'" in t.warnings[1] and "true (btpo (base))" in t.warnings[1]
    md = to_markdown(t)
    assert "| model-a | btpo (base) † |" in md and "| model-a | bt |" in md and "| model-b | btpo |" in md
    assert "† = eval settings differ" in md
    rows = {(r["model"], r["method"]): r for r in json.loads(to_json(t))["rows"]}
    assert rows[("model-a", "gram")]["settings_differ"] == ["thought_budget"]
    got = {(r["model"], r["method"]): r["settings_differ"] for r in csv.DictReader(io.StringIO(to_csv(t)))}
    assert got[("model-a", "btpo (base)")] == "thought_budget;yes_no_normalize" and got[("model-a", "bt")] == ""


def test_settings_of_older_eval_files_come_from_eval_config() -> None:
    from btpo_cli.compare import eval_settings_of

    old = {"method": "btpo", "engine": "hf", "eval_config": {"max_new_tokens": 48, "samples": 4}}
    assert eval_settings_of(old) == {"engine": "hf", "thought_budget": 48, "samples": 4}
    assert eval_settings_of({"method": "bt", "engine": None, "eval_config": {"max_new_tokens": 1000}}) == {}


def test_band_is_mean_min_max_over_the_runs_that_logged_each_step() -> None:
    from btpo_cli.compare import _band

    steps, mean, lo, hi = _band([([1, 2, 3], [1.0, 2.0, 3.0]), ([1, 2], [3.0, 0.0])])
    assert steps == [1, 2, 3]
    assert mean == [2.0, 1.0, 3.0] and lo == [1.0, 0.0, 3.0] and hi == [3.0, 2.0, 3.0]


def test_old_format_evals_still_compare_and_are_stale_once_their_model_was_retrained(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    kept = fake_run(root, "a-bt", "model-a", "bt", {"hh": 0.60})           # no final/: unknown provenance
    redone = fake_run(root, "a-gram", "model-a", "gram", {"hh": 0.65, "math": 0.70})
    (redone / "final").mkdir()
    (redone / "final" / "btpo.json").write_text(json.dumps(     # a resume rewrote it: only math is still its result
        {"method": "gram", "eval": {"math/test": {"n": 200, "accuracy": 0.70, "raw_accuracy": 0.70}}}))
    c = collect([root])
    assert [r.name for r in c.runs] == ["a-bt", "a-gram"] and not c.missing_eval
    assert set(c.runs[1].results) == {"math"}
    assert [(Path(x["path"]).parent.parent.name, x["dataset"], x["reason"]) for x in c.stale] == [
        ("a-gram", "hh", "model changed since eval")]
    doc = json.loads(to_json(build_table(collect([root], include_stale=True))))
    gram = next(r for r in doc["rows"] if r["method"] == "gram")
    assert gram["cells"]["hh"]["stale"] == "model changed since eval" and gram["cells"]["math"]["stale"] is None
    assert "‡" in to_markdown(build_table(collect([root], include_stale=True)))
    p = run_btpo("compare", str(root), "--format", "csv")
    assert "stale (left out)" in p.stderr and str(redone / "eval" / "hh.json") in p.stderr
    rows = list(csv.DictReader(io.StringIO(p.stdout)))
    assert next(r for r in rows if r["method"] == "gram")["hh"] == "" and kept.name in p.stdout
    st = json.loads(run_btpo("status", str(redone), "--format", "json", check=False).stdout)["evals"]
    assert st["hh"]["stale"] == "model changed since eval" and st["math"]["stale"] is None
    assert st["math"]["provenance"] == "unknown"
