"""What a torchrun check script leaves behind: this rank's results and a digest of them, so a test can
compare ranks (equal digests) and read the values."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def write_rank_results(out: Path, results: dict) -> None:
    blob = json.dumps(results, sort_keys=True)
    rank = int(os.environ.get("RANK", "0"))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({"results": results,
                                                      "sha256": hashlib.sha256(blob.encode()).hexdigest()}))


def read_rank_results(out: Path, ranks: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
