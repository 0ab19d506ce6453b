"""Process groups for one worker: the world, its TP group, and gloo twins for host-side control.

The store is created explicitly (not through an init_method URL) so the job runner can use the same
store to hand out work, and so "address already in use" can be reported as what it is.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    tp_rank: int
    tp_size: int
    dp_rank: int
    dp_size: int
    store: dist.Store
    world_group: dist.ProcessGroup
    world_cpu_group: dist.ProcessGroup
    tp_group: dist.ProcessGroup
    tp_cpu_group: dist.ProcessGroup
    tp_group_ranks: list[int]

    @property
    def is_tp_leader(self) -> bool:
        return self.tp_rank == 0


def check_world(world_size: int, tp: int, dp: int) -> None:
    if tp * dp != world_size:
        raise ValueError(
            f"tp({tp}) * dp({dp}) = {tp * dp} != WORLD_SIZE({world_size}); launch tp * dp processes "
            "or change --tp / --dp"
        )


def init_distributed(dargs, backend: str, tp_size: int, dp_size: int, timeout_s: float) -> DistContext:
    """dargs: a DistributedArgs (duck-typed: the worker does not import the launchers)."""
    check_world(dargs.world_size, tp_size, dp_size)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = _job_store(dargs, timeout)
    if dist.is_initialized():
        log.warning("a default process group already exists; tprun replaces it")
        dist.destroy_process_group()
    dist.init_process_group(backend, store=store, rank=dargs.rank, world_size=dargs.world_size,
                            timeout=timeout)
    world = dist.group.WORLD
    world_cpu = world if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    tp_group = tp_cpu = None
    # Every rank must create every subgroup, in the same order.
    for g in range(dp_size):
        ranks = list(range(g * tp_size, (g + 1) * tp_size))
        grp = dist.new_group(ranks, backend=backend, timeout=timeout)
        cpu = grp if backend == "gloo" else dist.new_group(ranks, backend="gloo", timeout=timeout)
        if dargs.rank in ranks:
            tp_group, tp_cpu, my_ranks = grp, cpu, ranks
    return DistContext(
        rank=dargs.rank, world_size=dargs.world_size, local_rank=dargs.local_rank,
        tp_rank=dargs.rank % tp_size, tp_size=tp_size, dp_rank=dargs.rank // tp_size, dp_size=dp_size,
        store=store, world_group=world, world_cpu_group=world_cpu, tp_group=tp_group,
        tp_cpu_group=tp_cpu, tp_group_ranks=my_ranks,
    )


# One TCPStore per master address for the life of the process. Tearing a store down and binding the
# same port again races with the peers' reconnects, so a second LLM in the same process (or a
# reinitialised group on the same master) reuses it under a fresh key prefix. Every rank creates its
# engines in the same order, so the prefixes agree.
_STORES: dict[tuple[str, int, int], dist.Store] = {}
_GENERATION = [0]


def connect_store(dargs, timeout_s: float) -> dist.Store:
    """The job's store itself (created once per master address); the runner uses it to agree on
    starting before the process groups exist, and the process groups then reuse it."""
    key = (dargs.master_addr, dargs.master_port, dargs.rank)
    if key not in _STORES:
        _STORES[key] = _make_store(dargs, datetime.timedelta(seconds=timeout_s))
    return _STORES[key]


def _job_store(dargs, timeout: datetime.timedelta) -> dist.Store:
    store = connect_store(dargs, timeout.total_seconds())
    _GENERATION[0] += 1
    # torchrun's agent store outlives a restarted attempt: without the attempt number, attempt 1
    # would read attempt 0's stale addresses.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"tprun/attempt-{attempt}/{_GENERATION[0]}/", store)


def _make_store(dargs, timeout: datetime.timedelta) -> dist.Store:
    is_master = dargs.rank == 0 and not getattr(dargs, "store_hosted_by_launcher", False)
    try:
        return dist.TCPStore(dargs.master_addr, dargs.master_port, dargs.world_size, is_master,
                             timeout=timeout, wait_for_workers=False, use_libuv=True)
    except (RuntimeError, OSError) as e:
        text = str(e)
        if is_master and ("address already in use" in text.lower() or "EADDRINUSE" in text):
            raise RuntimeError(
                f"master port {dargs.master_port} on {dargs.master_addr} is already in use; "
                "set MASTER_PORT to a free port (or stop the process holding it)"
            ) from e
        raise RuntimeError(
            f"rank {dargs.rank} could not reach the rendezvous store at {dargs.init_method} within "
            f"{timeout.total_seconds():.0f} s: {text.splitlines()[0] if text else e!r}; check that rank 0 "
            "started and MASTER_ADDR/MASTER_PORT point to it"
        ) from e


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
