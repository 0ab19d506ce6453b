"""Fixtures shared across test files. Keep each one small and session-scoped when it is expensive."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> Path:
    """The tiny random Llama checkpoint of `tprun demo-model` (seed 0), built once per session."""
    from tprun.demo_model import make_demo_model

    return make_demo_model(tmp_path_factory.mktemp("demo-model") / "llama", arch="llama", seed=0)
