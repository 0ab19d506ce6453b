from tprun.executor.external_launcher import ExecutorWithExternalLauncher
from tprun.executor.uniproc import UniProcExecutor
from tprun.worker.worker import ReconfigureDistributedRequest

EXECUTORS = {"uni": UniProcExecutor, "external_launcher": ExecutorWithExternalLauncher}

__all__ = ["EXECUTORS", "ExecutorWithExternalLauncher", "ReconfigureDistributedRequest", "UniProcExecutor"]
