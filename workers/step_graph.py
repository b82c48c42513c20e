"""Run a training step as one replayed CUDA graph, or eagerly where a graph cannot be had.

Floor: workers (trial execution; imports sweep.core and sweep.store only).

The engine's step (forward, loss, backward, optimizer, divergence bookkeeping, step
counters) reads everything it needs from device tensors at fixed addresses, so it can be
captured once per stage and replayed: one launch per step instead of dozens, and no
Python between kernels. The first ``WARMUP_STEPS`` steps of a stage run eagerly on a side
stream (they are real steps: cuBLAS/cuDNN handles, lazy optimizer state and cached
tensors are made there, outside the capture), then the step is captured and replayed.

Eager where capture is impossible, with the reason logged once per stage: on the CPU,
when graphs are turned off (``StageConfig.cuda_graph``), or when a capture fails (the
failure's message; training goes on eagerly from the same state, since a capture runs
no kernel).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

WARMUP_STEPS = 3


class StepRunner:
    """Calls ``step`` once per call: eagerly, or by replaying its captured CUDA graph."""

    def __init__(self, step: Callable[[], None], device: torch.device, use_graph: bool, label: str,
                 on_fallback: Callable[[], None] | None = None) -> None:
        # ``on_fallback``: undoes Python-side state a failed capture left behind (the capture
        # ran the step's Python without its kernels).
        self.step, self.device, self.label, self.on_fallback = step, device, label, on_fallback
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warm = 0
        self.reason: str | None = None
        if device.type != "cuda":
            self._eager("CUDA graphs need a CUDA device")
        elif not use_graph:
            self._eager("CUDA graphs turned off for this stage")

    @property
    def mode(self) -> str:
        return "graph" if self.graph is not None else "eager"

    def _eager(self, reason: str, level: int = logging.INFO) -> None:
        self.reason = reason
        log.log(level, "%s: training steps run eagerly (%s)", self.label, reason)

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        elif self.reason is not None:
            self.step()
        elif self.warm < WARMUP_STEPS:
            self._warm_up()
        else:
            self._capture()

    def _warm_up(self) -> None:
        main = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            self.step()
        main.wait_stream(side)
        self.warm += 1

    def _capture(self) -> None:
        main = torch.cuda.current_stream(self.device)
        graph = torch.cuda.CUDAGraph()
        failure = None
        try:
            with torch.cuda.graph(graph):
                self.step()
        except Exception as e:  # noqa: BLE001 - any failure means: go on without a graph
            failure = f"{type(e).__name__}: {e}"  # kept as text: the traceback would pin the capture's tensors
        if failure is not None:
            # A capture that broke inside may leave the thread on its stream; its tensors and
            # memory pool go with the graph.
            torch.cuda.set_stream(main)
            del graph
            gc.collect()
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            if self.on_fallback is not None:
                self.on_fallback()
            self._eager(f"capture failed: {failure}", logging.WARNING)
            self.step()
            return
        self.graph = graph
        log.info("%s: training step captured as one CUDA graph", self.label)
        graph.replay()  # capturing recorded the step without running it
