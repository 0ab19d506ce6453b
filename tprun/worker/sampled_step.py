"""A step's sampled tokens on the device, and the host's copy of everything the step returns.

The next step reads the tokens where they are (scheduling one step ahead): the host does not wait for
them before launching it. Everything the host needs (tokens, log-probabilities) goes down in one batch of
non-blocking copies into pinned memory; `result()` waits for those copies only, then builds the output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tprun.worker.step import SamplerOutput


class SampledStep:
    def __init__(self, tokens: torch.Tensor, tensors: list[torch.Tensor],
                 build: Callable[[list[list]], SamplerOutput]) -> None:
        """tokens: [rows] on the device; tensors: what `build` needs on the host (tokens first), as lists."""
        self.tokens = tokens
        self._build = build
        if tokens.is_cuda:
            self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for h, t in zip(self._host, tensors):
                h.copy_(t, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record()
        else:
            self._host, self._done = tensors, None
        self._result: SamplerOutput | None = None
        self._then: list[Callable[[SamplerOutput], None]] = []

    def then(self, fn: Callable[[SamplerOutput], None]) -> None:
        """Run fn on the output once it reaches the host (the worker's divergence check)."""
        self._then.append(fn)

    def wait(self) -> None:
        """Until the step has run on the device (its copies are its last work)."""
        if self._done is not None:
            self._done.synchronize()

    def result(self) -> SamplerOutput:
        if self._result is None:
            self.wait()
            self._result = self._build([h.tolist() for h in self._host])
            self._host = []
            for fn in self._then:
                fn(self._result)
        return self._result
