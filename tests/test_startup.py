"""Ranks start together or fail together: a rank that cannot start, or that reads other files than rank 0
(node-local copies of a model or input), ends every rank within 60 s, naming the rank and the file; and
nothing another process plants in the job's store is ever unpickled.

Rank 1 runs as if on another node: `private_dir` gives it its own copy of a directory at the same path.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.procs import free_port
from tests.runner_harness import ROOT, base_env, launch_ranks, private_dir, run_args, write_jsonl
from tprun.runner.exit_codes import EXIT_FAILED, EXIT_JOB_ERROR

pytestmark = pytest.mark.slow

NO_HANG_S = 60


def _can_unshare() -> bool:
    r = subprocess.run(["unshare", "--mount", "true"], check=False, capture_output=True, timeout=30)
    return r.returncode == 0


needs_unshare = pytest.mark.skipif(not _can_unshare(), reason="needs a private mount namespace (unshare --mount)")


def _node_copy(model: Path, dest: Path, change: dict[str, str]) -> Path:
    """A copy of `model` as another node might hold it: the same checkpoint, some files edited."""
    shutil.copytree(model, dest)
    for name, text in change.items():
        (dest / name).write_text(text)
    return dest


@needs_unshare
def test_ranks_whose_tokenizer_files_differ_stop_before_the_first_step_naming_the_files(demo_model, tmp_path):
    tokenizer = json.loads((demo_model / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = tokenizer["added_tokens"][:-1]  # a node with an older tokenizer
    gen = json.loads((demo_model / "generation_config.json").read_text())
    other = _node_copy(demo_model, tmp_path / "node-b", {
        "tokenizer.json": json.dumps(tokenizer), "generation_config.json": json.dumps({**gen, "temperature": 0.1})})
    model = tmp_path / "model"
    shutil.copytree(demo_model, model)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    ranks = launch_ranks(2, run_args(model, inp, tmp_path / "out", "--tp", "2"), tmp_path / "logs",
                         wrap={1: private_dir(model, fill_from=other)})
    times = ranks.wait(timeout=240)
    assert ranks.codes == [EXIT_JOB_ERROR, EXIT_JOB_ERROR], ranks.output()
    assert max(times) - min(times) < NO_HANG_S
    for r in range(2):
        text = ranks.output(r)
        assert "rank(s) [1] (on" in text, text
        assert "model file generation_config.json, model file tokenizer.json" in text, text
        assert "model file config.json" not in text and "model.safetensors" not in text
    assert not (tmp_path / "out" / "parts").exists() or not list((tmp_path / "out" / "parts").iterdir())


@needs_unshare
@pytest.mark.parametrize("victim", [0, 1])
def test_input_missing_on_one_rank_stops_every_rank_within_60s_naming_it(demo_model, tmp_path, victim):
    shared = tmp_path / "shared"
    shared.mkdir()
    inp = write_jsonl(shared / "in.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    t0 = time.monotonic()
    ranks = launch_ranks(2, run_args(demo_model, inp, tmp_path / "out", "--dp", "2"), tmp_path / "logs",
                         wrap={victim: private_dir(shared)})
    ranks.wait(timeout=NO_HANG_S + 60)
    assert time.monotonic() - t0 < NO_HANG_S, ranks.output()
    assert ranks.codes == [EXIT_JOB_ERROR, EXIT_JOB_ERROR], ranks.output()
    survivor = 1 - victim
    text = ranks.output(survivor)
    assert f"stopping because rank {victim} (" in text, text
    assert "in.jsonl does not exist" in text and "(failed before the job started)" in text, text


@needs_unshare
def test_a_rank_whose_engine_cannot_start_ends_every_rank_naming_it(demo_model, tmp_path):
    """Rank 1's node holds a checkpoint of an unsupported architecture: its engine fails while rank 0's is
    already waiting for it in the rendezvous."""
    config = json.loads((demo_model / "config.json").read_text())
    other = _node_copy(demo_model, tmp_path / "node-b",
                       {"config.json": json.dumps({**config, "architectures": ["NotAModel"]})})
    model = tmp_path / "model"
    shutil.copytree(demo_model, model)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}])
    t0 = time.monotonic()
    ranks = launch_ranks(2, run_args(model, inp, tmp_path / "out", "--tp", "2"), tmp_path / "logs",
                         wrap={1: private_dir(model, fill_from=other)})
    ranks.wait(timeout=NO_HANG_S + 60)
    assert time.monotonic() - t0 < NO_HANG_S, ranks.output()
    assert ranks.codes == [EXIT_JOB_ERROR, EXIT_JOB_ERROR], ranks.output()
    text = ranks.output(0)
    assert "stopping because rank 1 (" in text and "unsupported model architecture NotAModel" in text, text
    assert "(failed while starting the engine)" in text, text


# -- the store: a TCP port anyone who can reach it may write to --------------------------------------------

PLANT = """
import datetime, os, pickle, sys
import torch.distributed as dist

class Evil:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[4],))

host, port, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
store = dist.TCPStore(host, port, 2, False, timeout=datetime.timedelta(seconds=60))
payload = pickle.dumps(Evil()) if kind == "pickle" else b"\\x00\\xffnot a verdict"
for key in sys.argv[5:]:
    if key.endswith(("/published", "/left")):
        store.add(key, 1)
    else:
        store.set(key, payload)
"""


def _plant(port: int, kind: str, marker: Path, *keys: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PLANT, "127.0.0.1", str(port), kind, str(marker), *keys],
                            env=base_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.parametrize("kind", ["garbage", "pickle"])
def test_a_value_planted_in_the_store_is_an_error_naming_the_key_never_unpickled(demo_model, tmp_path, kind):
    """Another process plays rank 1 and writes its start-up verdict: rank 0 names the key and stops."""
    from tprun.runner import keys

    port = free_port()
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}])
    env = base_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
    cmd = [sys.executable, "-m", "tprun", "run", *run_args(demo_model, inp, tmp_path / "out", "--dp", "2")]
    log = tmp_path / "rank0.log"
    board = f"{keys.PREFIX}run-1/startup/"
    marker = tmp_path / "pwned"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        planter = _plant(port, kind, marker, f"{board}plan/1", f"{board}plan/published", f"{board}left")
        try:
            proc.wait(timeout=NO_HANG_S)
            planter.wait(timeout=30)
        finally:
            for p in (proc, planter):
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=30)
    text = log.read_text()
    assert proc.returncode == EXIT_FAILED, text
    assert f"malformed value under store key '{board}plan/1'" in text, text
    assert not marker.exists()


def test_values_the_runner_reads_from_the_store_are_parsed_strictly(tmp_path):
    """FINAL, a group's result, ABORT and a rank's host: each a clear error naming its key."""
    import datetime

    import torch.distributed as dist

    from tprun.runner import keys
    from tprun.runner.finish import _group_result
    from tprun.runner.finish import final_code as _final
    from tprun.runner.store_values import StoreValueError
    from tprun.runner.watchdog import Watchdog, _host_key

    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=30), wait_for_workers=False)
    marker = tmp_path / "pwned"
    targets = [keys.FINAL, keys.group_result(0), keys.ABORT, _host_key(1)]
    planter = _plant(store.port, "pickle", marker, *targets)
    assert planter.wait(timeout=60) == 0, planter.stdout.read().decode()
    watchdog = Watchdog(store, 0, 2)
    readers = {
        keys.FINAL: lambda: _final(store, watchdog),
        keys.group_result(0): lambda: _group_result(SimpleNamespace(store=store, world_size=2), 0, watchdog),
        keys.ABORT: watchdog._read_abort,
    }
    for key, read in readers.items():
        with pytest.raises(StoreValueError, match=re.escape(f"malformed value under store key '{key}'")):
            read()
    assert watchdog.describe(1) == "rank 1"  # best effort: a planted host name is not repeated
    store.set(keys.FINAL, "12345")
    with pytest.raises(StoreValueError, match="is not one of the expected integers"):
        _final(store, watchdog)
    store.set(keys.group_result(0), json.dumps({"group": 0, "ranks": [0, 7], "chunks": 1, "records": 1,
                                                "tokens": 1, "cached_prompt_tokens": 0, "seconds": 1.0,
                                                "stopped": None}))
    with pytest.raises(StoreValueError, match=r"expected a list of integers in \[0, 2\)"):
        _group_result(SimpleNamespace(store=store, world_size=2), 0, watchdog)
    assert not marker.exists()


def test_the_mismatch_message_names_each_differing_and_missing_file(demo_model, tmp_path):
    from tprun.runner.agree import _describe_mismatch
    from tprun.runner.manifest import components
    from tprun.runner.preflight import check_model

    other = _node_copy(demo_model, tmp_path / "node-b", {"chat_template.jinja": "{{ messages }}"})
    (other / "generation_config.json").unlink()
    (other / "tokenizer.model").write_bytes(b"sentencepiece")
    tables = [components({"model": check_model(str(m)).identity, "input": {"sha256": "x"}})
              for m in (demo_model, other)]
    text = _describe_mismatch(tables, ["node-a", "node-b"])
    assert ("rank 1 (node-b): model file chat_template.jinja, model file generation_config.json (missing on "
            "rank 1), model file tokenizer.model (missing on rank 0);") in text, text
    assert "input" not in text.split("differing:")[1]
