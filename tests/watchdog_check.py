"""One rank of a bare job: the store (hosted by rank 0) and a Watchdog, nothing else. It idles until the
watchdog ends it. Usage: watchdog_check.py RANK WORLD PORT PERIOD_S TIMEOUT_S"""

from __future__ import annotations

import datetime
import sys
import time

import torch.distributed as dist

from tprun.runner.watchdog import Watchdog


def main() -> None:
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    period, timeout = float(sys.argv[4]), float(sys.argv[5])
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=datetime.timedelta(seconds=300),
                          wait_for_workers=False)
    store = dist.PrefixStore("job/", store)
    store.add("ready", 1)
    while store.add("ready", 0) < world:
        time.sleep(0.05)
    Watchdog(store, rank, world, period_s=period, timeout_s=timeout,
             log=lambda m: print(m, file=sys.stderr, flush=True)).start()
    print("watching", flush=True)
    time.sleep(600)


if __name__ == "__main__":
    main()
