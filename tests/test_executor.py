"""The seed's executor interface, on real torchrun ranks over gloo."""

from __future__ import annotations

import json

import pytest

from tests.procs import ROOT, free_port, torchrun


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> list[dict]:
    from tprun.demo_model import make_demo_model

    base = tmp_path_factory.mktemp("executor")
    model = make_demo_model(base / "model", arch="llama", seed=3)
    proc = torchrun(2, [str(ROOT / "tests" / "executor_check.py"), str(base / "out"), str(model),
                        str(free_port())], timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((base / "out" / f"rank{r}.json").read_text()) for r in range(2)]


def test_ranks_with_different_kv_budgets_agree_on_the_minimum(reports):
    own = [r["own_blocks"] for r in reports]
    assert own[0] < own[1], "the test gives rank 1 twice rank 0's budget"
    assert [r["num_blocks"] for r in reports] == [min(own)] * 2


def test_collective_rpc_by_method_name_and_by_callable(reports):
    for r in reports:
        assert r["rpc_name"] == [r["own_blocks"]]
        assert r["rpc_callable"] == [[r["rank"], 7]]


def test_collective_rpc_non_block_returns_a_future_and_timeout_raises(reports):
    assert all(r["non_block_is_future"] for r in reports)
    assert all(r["timeout_raised"] for r in reports)


def test_reinitialize_distributed_keeps_generating_the_same_tokens(reports):
    assert all(r["same_tokens_after_reinit"] for r in reports)


def test_check_health_fails_once_the_process_group_is_gone(reports):
    assert all("destroyed" in r["health_after_destroy"] for r in reports)
