"""The rollout-engine contract: what every engine takes, returns and promises.

An engine turns prompt token ids into sampled continuations. It is built by name
(:func:`btpo_cli.engines.build_engine`) from the ``rollout`` config section and lives for a whole
training run or evaluation::

    engine.generate(prompts, n, params, seeds) -> result      # result[i][j]: j-th sample of prompt i
    engine.update_weights(weights)                           # once per rollout, full (unsharded) weights
    engine.shares_module(module) -> bool                     # generates with module's own tensors: no sync
    engine.sleep(); engine.wake()                            # free / take back memory around the update
    engine.stats() -> dict                                   # counters since construction
    engine.close()

Promises every engine keeps (``tests/engines/test_engines.py`` checks them for each registered engine):

- greedy (``temperature == 0``) equals a cache-free argmax decode of the engine's weights;
- a continuation's ``token_ids`` include the stop token when generation stopped on one
  (``finished=True``); one cut at ``max_new_tokens`` has ``finished=False``;
- sampling is a pure function of (weights, prompt, params, seed of the sample): the ``j``-th
  sample of prompt ``i`` uses :func:`sample_seed` ``(seeds[i], j)``, so a killed and resumed run
  re-draws exactly the thoughts an uninterrupted one draws, whatever RNG the engine uses inside;
- after ``update_weights`` the engine generates with the new weights;
- a refused update (an unknown name, a wrong shape, for vLLM a missing weight) raises before
  anything is copied and leaves the engine as it was.

Weights travel as a :class:`WeightStream`: every (name, shape) known up front (a metadata pass:
no tensor gathered or built), the tensors produced one at a time. An engine checks the names and
shapes first, then copies each tensor as it arrives and lets it go, so a sync needs the memory of
one tensor (a gathered or merged one), not of a second copy of the model. A plain iterable of
(name, tensor) pairs is accepted too (:meth:`WeightStream.of` holds it whole to check it first:
free for a list of existing tensors, a full copy for a generator of new ones).

Seeds are derived, never carried: the trainer names each request by (run seed, rollout, unit,
response) through :func:`request_seed`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch



@dataclass
class SamplingParams:
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    """Base seed when ``generate`` gets no per-prompt seeds: prompt ``i`` uses ``request_seed(seed, i)``.
    With neither, each prompt's seed is drawn from the global torch RNG."""
    logprobs: bool = False
    """Return the engine's log-probability of every sampled token (``Sample.logprobs``), taken at
    ``temperature`` (the distribution sampled from)."""


@dataclass
class Sample:
    token_ids: list[int]
    finished: bool
    """True iff generation stopped on one of ``stop_token_ids`` (which ends ``token_ids``)."""
    logprobs: list[float] | None = None
    """The engine's log-prob of each token of ``token_ids`` when ``SamplingParams.logprobs``."""

    def __eq__(self, other: object) -> bool:          # log-probs are diagnostics, not identity
        return isinstance(other, Sample) and (self.token_ids, self.finished) == (other.token_ids, other.finished)


class WeightStream:
    """Full weights for ``update_weights``: ``shapes`` (name → shape, in stream order) known before
    any tensor exists, and the (name, tensor) pairs themselves produced one at a time by iterating
    (once). Iterating checks each tensor against what was announced: a producer that strays from
    its own ``shapes`` is a bug, raised as :class:`RuntimeError`."""

    def __init__(self, shapes: Mapping[str, Sequence[int]], tensors: Iterable[tuple[str, torch.Tensor]]):
        self.shapes: dict[str, tuple[int, ...]] = {n: tuple(s) for n, s in shapes.items()}
        self._tensors = tensors

    @classmethod
    def of(cls, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> WeightStream:
        """``named_tensors`` itself when it is a stream; else all its pairs, held to be checked first."""
        if isinstance(named_tensors, WeightStream):
            return named_tensors
        pairs = list(named_tensors)
        shapes: dict[str, tuple[int, ...]] = {}
        for name, t in pairs:
            shapes.setdefault(name, tuple(t.shape))
        return cls(shapes, pairs)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in self._tensors:
            if self.shapes.get(name) != tuple(t.shape):
                raise RuntimeError(f"weight stream: {name!r} with shape {tuple(t.shape)} was announced as "
                                   f"{self.shapes.get(name)}")
            yield name, t


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer, the evaluators and the data builders may call."""

    name: str

    def generate(self, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams,
                 seeds: Sequence[int] | None = None) -> list[list[Sample]]:
        """``n`` continuations of every prompt; ``seeds[i]`` (optional) names prompt ``i``'s request."""
        ...

    def update_weights(self, named_tensors: WeightStream | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full (unsharded) weights, named as in the Hugging Face checkpoint of the model: check
        every name and shape (``WeightStream.shapes``) before the first copy, then copy the tensors
        one at a time as the stream yields them, keeping none."""
        ...

    def shares_module(self, module: Any) -> bool:
        """True when the engine generates with ``module``'s own parameters (built on the trainer's module,
        ``EngineSpec.module``): the trainer then needs no ``update_weights``, only the parameters
        gathered while it generates (``TrainSession.engine_weights``)."""
        ...

    def sleep(self) -> None:
        """Release what memory the engine can (KV cache, weights) until :meth:`wake`; may be a no-op."""
        ...

    def wake(self) -> None: ...

    def stats(self) -> dict[str, float]:
        """Counters since construction: at least ``generated_tokens`` and ``prompt_tokens``."""
        ...

    def close(self) -> None: ...


# ----------------------------------------------------------------------------- seeds

_MASK63 = (1 << 63) - 1


def _hash(*parts: Any) -> int:
    text = ":".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & _MASK63


def request_seed(*parts: Any) -> int:
    """A 63-bit seed named by its parts, e.g. ``request_seed(run_seed, rollout, unit, response)``.

    Stable across processes, machines and Python versions (no ``hash()`` randomization)."""
    return _hash("request", *parts)


def sample_seed(request: int, j: int) -> int:
    """The seed of the ``j``-th sample of a request (what every engine samples sample ``j`` with)."""
    return _hash("sample", request, j)


def resolve_seeds(n_prompts: int, params: SamplingParams, seeds: Sequence[int] | None) -> list[int]:
    """Per-prompt request seeds: given, derived from ``params.seed``, or drawn from torch's RNG."""
    if seeds is not None:
        if len(seeds) != n_prompts:
            raise ValueError(f"got {len(seeds)} seeds for {n_prompts} prompts")
        return [int(s) for s in seeds]
    if params.seed is not None:
        return [request_seed(params.seed, i) for i in range(n_prompts)]
    import torch  # heavy: imported on use

    return [int(x) for x in torch.randint(0, 2**62, (n_prompts,)).tolist()]
