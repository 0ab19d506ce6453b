"""Apply structured-output token masks to logits in plain torch (CPU or CUDA; no grammar library here)."""

from __future__ import annotations

import torch

_BITS_CACHE: dict[torch.device, torch.Tensor] = {}


def _bit_positions(device: torch.device) -> torch.Tensor:
    bits = _BITS_CACHE.get(device)
    if bits is None:
        bits = _BITS_CACHE[device] = torch.arange(32, dtype=torch.int32, device=device)
    return bits


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """bool [rows, vocab] from an int32 bitmask [rows, words] (bit j of word i allows token 32*i+j).

    Tokens past the bitmask's 32*words are disallowed (e.g. a TP-padded vocabulary wider than the grammar's)."""
    bits = _bit_positions(bitmask.device)
    # Arithmetic right shift on int32: bit 31 comes out as -1, and & 1 still gives 1.
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).flatten(-2).bool()
    width = allowed.shape[-1]
    if width >= vocab:
        return allowed[..., :vocab]
    return torch.nn.functional.pad(allowed, (0, vocab - width), value=False)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """Set disallowed logits to -inf in place.

    logits: [batch, vocab] (any float dtype, any vocab width); bitmask: int32 [n, words] on any device;
    rows: the n distinct logits rows the bitmask rows belong to (default: all rows, n == batch)."""
    if bitmask.dtype != torch.int32 or bitmask.dim() != 2:
        raise ValueError(f"bitmask must be a 2-D int32 tensor, got {bitmask.dtype} with shape {tuple(bitmask.shape)}")
    n = logits.shape[0] if rows is None else rows.shape[0]
    if bitmask.shape[0] != n:
        raise ValueError(f"bitmask has {bitmask.shape[0]} rows but {n} logits rows are to be masked")
    disallowed = ~unpack_bitmask(bitmask.to(logits.device, non_blocking=True), logits.shape[-1])
    if rows is None:
        logits.masked_fill_(disallowed, float("-inf"))
        return
    rows = rows.to(logits.device, dtype=torch.long, non_blocking=True)
    logits.index_put_((rows,), logits.index_select(0, rows).masked_fill_(disallowed, float("-inf")))
