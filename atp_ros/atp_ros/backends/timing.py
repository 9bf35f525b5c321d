"""Stage timing of one backend call, with ``generate`` split into prefill and decode."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from atp_ros.backends.results import STAGES, StageTimings


class Stopwatch:
    """Accumulates stage times; synchronizes CUDA so GPU time is real, not launch time."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._ms = dict.fromkeys(STAGES, 0.0)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def add(self, stage: str, ms: float) -> None:
        if stage not in self._ms:
            raise ValueError(f"unknown stage {stage!r}")
        self._ms[stage] += ms

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if name not in self._ms:
            raise ValueError(f"unknown stage {name!r}")
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.add(name, (time.perf_counter() - start) * 1e3)

    def timings(self) -> StageTimings:
        """The times so far, frozen."""
        return StageTimings(**self._ms)


def generate_timed(generate: Callable[..., torch.Tensor], watch: Stopwatch, **kwargs) -> torch.Tensor:
    """Call an HF ``generate`` and book its time as ``setup``, ``prefill`` and ``decode``.

    ``setup`` ends when generate hands the prompt to its streamer (inputs checked and expanded,
    right before the prefill), ``prefill`` at the first logits (a pass-through logits processor),
    ``decode`` at the end. Neither changes the tokens: they are exactly those of the same
    ``generate`` call without them. On CUDA no streamer is attached: generate copies every new
    token to the host for a streamer, a sync per token that would slow the decode it measures;
    there ``setup`` stays 0 and the prefill includes it.
    """
    from transformers import LogitsProcessor, LogitsProcessorList

    marks: dict[str, float] = {}

    class _FirstLogits(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if "prefill" not in marks:
                watch.sync()
                marks["prefill"] = time.perf_counter()
            return scores

    class _PromptMark:  # the streamer protocol: put(ids) / end()
        def put(self, _ids: torch.Tensor) -> None:
            if "setup" not in marks:
                marks["setup"] = time.perf_counter()

        def end(self) -> None:
            pass

    processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
    processors.append(_FirstLogits())
    watch.sync()
    start = time.perf_counter()
    streamer = _PromptMark() if watch.device.type == "cpu" else None
    out = generate(logits_processor=processors, streamer=streamer, **kwargs)
    watch.sync()
    end = time.perf_counter()
    prefill_end = marks.get("prefill", end)
    setup_end = min(marks.get("setup", start), prefill_end)
    watch.add("setup", (setup_end - start) * 1e3)
    watch.add("prefill", (prefill_end - setup_end) * 1e3)
    watch.add("decode", (end - prefill_end) * 1e3)
    return out
