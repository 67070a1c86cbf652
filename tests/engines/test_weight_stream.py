"""A weight sync streams: the engine checks every announced name and shape first, then copies the
tensors one at a time, so a sync holds about one tensor beyond the model, not a second copy of it
(what a plain list / generator costs, the behaviour before ``WeightStream``)."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from btpo_cli.engines import EngineSpec, WeightStream, build_engine
from btpo_cli.models.tiny import ensure_tiny


class Produced:
    """Fresh tensors (like gathered or merged ones) made one at a time; counts the bytes alive."""

    def __init__(self, model: Any, scale: float = 0.01):
        self.model, self.scale = model, scale
        self.live = self.peak = self.made = 0

    def _freed(self, n: int) -> None:
        self.live -= n

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, p in self.model.named_parameters():
            t = p.detach() + self.scale          # a new tensor, as a gather or a LoRA merge makes
            n = t.numel() * t.element_size()
            self.live += n
            self.made += 1
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._freed, n)
            yield name, t
            del t

    def stream(self) -> WeightStream:
        return WeightStream({n: p.shape for n, p in self.model.named_parameters()}, self.tensors())


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The hf engine built from a folder (its own weights) of a random tiny-qwen2 with 16 layers
    (~3 MB, its largest tensor, the embedding, an eighth of it)."""
    config = AutoConfig.from_pretrained(ensure_tiny("tiny-qwen2"))
    config.num_hidden_layers = 16
    config.layer_types = [config.layer_types[0]] * 16
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("random-qwen2")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    eng = build_engine("hf", EngineSpec(model_path=str(folder), pad_token_id=0, device="cpu", dtype="float32"))
    yield eng
    eng.close()


def _sizes(model: Any) -> tuple[int, int]:
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    return sum(sizes), max(sizes)


def test_a_streamed_sync_holds_one_tensor_not_a_copy_of_the_model(engine: Any) -> None:
    total, largest = _sizes(engine.model)
    want = {n: p.detach() + 0.01 for n, p in engine.model.named_parameters()}
    src = Produced(engine.model)
    engine.update_weights(src.stream())
    assert src.made == len(want)
    assert src.peak <= 2 * largest, (src.peak, largest)          # the tensor copied and, at most, the next one
    assert src.peak < total / 5, (src.peak, total)
    for n, p in engine.model.named_parameters():
        assert torch.equal(p, want[n]), n

    old = Produced(engine.model)                                 # a plain generator: held whole to be checked
    engine.update_weights(old.tensors())
    assert old.peak >= total - 1, (old.peak, total)


def test_a_refused_stream_makes_no_tensor_and_changes_nothing(engine: Any) -> None:
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    src = Produced(engine.model)
    stream = src.stream()
    first = next(iter(stream.shapes))
    stream.shapes[first] = (*stream.shapes[first][:-1], stream.shapes[first][-1] + 1)
    with pytest.raises(ValueError, match="shape"):
        engine.update_weights(stream)
    assert src.made == 0                                         # checked before the first tensor exists
    bad = WeightStream({**src.stream().shapes, "model.not_a_weight": (3,)}, src.tensors())
    with pytest.raises(KeyError, match="model.not_a_weight"):
        engine.update_weights(bad)
    assert src.made == 0
    for n, p in engine.model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_a_stream_that_strays_from_its_announced_shapes_is_a_producer_bug() -> None:
    stream = WeightStream({"w": (2,)}, [("w", torch.zeros(3))])
    with pytest.raises(RuntimeError, match="announced"):
        list(stream)
