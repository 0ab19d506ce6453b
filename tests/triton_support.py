"""Where the Triton kernels can run: a CUDA device, or Triton's CPU interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def skip_module_without_triton(what: str) -> None:
    if not torch.cuda.is_available() and not (INTERPRET and importlib.util.find_spec("triton")):
        pytest.skip(f"{what}: a CUDA device is needed (or TRITON_INTERPRET=1 with triton installed, to run in "
                    "Triton's CPU interpreter)", allow_module_level=True)
