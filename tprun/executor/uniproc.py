"""The executor drives exactly one local worker; ExternalLauncher adds the rank's place in the job."""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable
from typing import Any

from tprun.config import EngineConfig
from tprun.launchers.base import DistributedArgs
from tprun.launchers.local import LocalLauncher
from tprun.worker.sampled_step import SampledStep
from tprun.worker.step import StepInput
from tprun.worker.worker import ReconfigureDistributedRequest, Worker


class UniProcExecutor:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.worker: Worker | None = None
        self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tprun-rpc")
        self._init_executor()

    def _distributed_args(self) -> DistributedArgs:
        # A world of one on loopback, whatever launcher variables the environment holds.
        return LocalLauncher({}).distributed_args()

    def _init_executor(self) -> None:
        self.worker = Worker(self.config, self._distributed_args())
        self.worker.init_device()
        self.worker.load_model()

    @property
    def dist(self):
        return self.worker.dist

    def determine_num_available_blocks(self) -> int:
        return self.worker.determine_num_available_blocks()

    def initialize_cache(self, num_blocks: int) -> None:
        self.worker.initialize_cache(num_blocks)

    def execute_model(self, step: StepInput) -> SampledStep:
        """Launch the step on the local worker; result() on the answer waits for its output."""
        return self.worker.execute_model(step)

    def collective_rpc(self, method: str | Callable[..., Any], timeout: float | None = None, args: tuple = (),
                       kwargs: dict | None = None, non_block: bool = False) -> list:
        """Run `method` on every worker this executor drives (here: one) and return their results.

        A string names a Worker method; a callable gets the worker as its first argument. With
        non_block the list holds futures. A timeout raises TimeoutError; the call itself cannot be
        interrupted and keeps running in its thread.
        """
        if isinstance(method, str):
            fn = getattr(self.worker, method, None)
            if not callable(fn):
                raise AttributeError(f"Worker has no method {method!r}")
        else:
            worker = self.worker

            def fn(*a, **kw):
                return method(worker, *a, **kw)

        future = self._pool.submit(fn, *args, **(kwargs or {}))
        if non_block:
            return [future]
        try:
            return [future.result(timeout=timeout)]
        except cf.TimeoutError:
            raise TimeoutError(f"collective_rpc({getattr(method, '__name__', method)!r}) did not finish "
                               f"within {timeout} s") from None

    def check_health(self) -> None:
        if self.worker is None:
            raise RuntimeError("executor has no worker")
        self.worker.check_health()

    def reinitialize_distributed(self, request: ReconfigureDistributedRequest) -> None:
        self.worker.reinitialize_distributed(request)

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
        self._pool.shutdown(wait=False, cancel_futures=True)
