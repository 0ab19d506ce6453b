"""Loading HF safetensors checkpoints into a tensor-parallel model, each rank reading only its slices.

Every checkpoint tensor is placed through the TP plan (tprun/worker/models/tp_plan.py) and handed, as a
lazy safetensors slice, to the weight_loader of the layer it lands in; the layer indexes the slice its
rank holds, so only those bytes are read from the memory-mapped file.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from tprun.worker.models.tp_plan import IGNORED_SUFFIXES, SPLIT_LAYERS, place

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: one file, or the shards an index names."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a safetensors index (no valid 'weight_map'): {e}") from e
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names checkpoint shards that do not exist: {', '.join(missing)}")
        return files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    raise FileNotFoundError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {model_dir}; tprun loads HF safetensors checkpoints "
        f"(convert .bin checkpoints with transformers' save_pretrained(safe_serialization=True))"
    )


@contextmanager
def open_checkpoint(path: Path) -> Iterator:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            yield f
    except SafetensorError as e:
        raise ValueError(f"cannot read checkpoint file {path}: {e}; the file is corrupt or truncated") from e


class _LazyTensor:
    """A safetensors slice with a torch-like .shape, read only where it is indexed."""

    def __init__(self, handle, name: str):
        self._slice = handle.get_slice(name)
        self.shape = tuple(self._slice.get_shape())

    def __getitem__(self, index: tuple[slice, ...]) -> torch.Tensor:
        return self._slice[index]


def load_weights(model: nn.Module, model_dir: str | Path) -> None:
    """Fill every parameter of `model` from the checkpoint in model_dir; a missing, stray or misshapen
    tensor is an error naming it."""
    files = checkpoint_files(model_dir)
    params = dict(model.named_parameters())
    # A tied weight appears once in `params`; its alias (lm_head.weight) must not overwrite it.
    aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)} - params.keys()
    loaded: dict[str, set] = defaultdict(set)

    for path in files:
        with open_checkpoint(path) as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                if name.endswith(IGNORED_SUFFIXES) or name in aliases:
                    continue
                placed = place(name)
                if placed is None or placed[0] not in params:
                    raise ValueError(
                        f"checkpoint tensor {name!r} in {path} has no place in the model; "
                        f"does config.json's architecture match the checkpoint?"
                    )
                target, placement = placed
                module_name = target.rpartition(".")[0]
                module = model.get_submodule(module_name)
                if not isinstance(module, SPLIT_LAYERS[placement.split]):
                    raise TypeError(
                        f"the TP plan splits {name!r} by {placement.split.value}, "
                        f"but {module_name} is a {type(module).__name__}"
                    )
                try:
                    module.weight_loader(params[target], _LazyTensor(handle, name), placement.shard)
                except ValueError as e:
                    raise ValueError(f"checkpoint tensor {name!r} in {path}: {e}") from e
                loaded[target].update(placement.fills or (placement.shard,))

    missing = [name for name in params if loaded[name] not in _parts(model, name)]
    if missing:
        raise ValueError(
            f"the checkpoint in {model_dir} lacks weights the model needs: {', '.join(missing)} "
            f"(fused weights missing one of their parts are listed too)"
        )


def _parts(model: nn.Module, param_name: str) -> list[set]:
    """The sets of shard ids that fill a parameter: the fused layers' parts, {None} for a whole tensor, or
    for experts either every (part, expert) or one stacked tensor."""
    module_name, _, leaf = param_name.rpartition(".")
    module = model.get_submodule(module_name)
    if hasattr(module, "expected_shards"):
        return module.expected_shards(leaf)
    return [set(getattr(module, "shard_ids", (None,)))]
