"""Drive a tprun model through a paged KV cache step by step, and compute the HF transformers reference.

Shared by tests/test_models.py (TP=1, in process) and tests/model_tp_check.py (TP=2 under torchrun).
"""

from __future__ import annotations

import torch
from torch import nn

from tprun.worker.attention_metadata import AttentionMetadata


class PagedRun:
    """A model with a KV cache allocated here (as the model runner does), fed sequences step by step."""

    def __init__(self, model: nn.Module, block_size: int = 4, num_blocks: int = 64, with_cache: bool = True):
        self.model = model
        self.block_size = block_size
        weight = next(model.parameters())
        self.device = weight.device
        if with_cache:
            for layer in model.attention_layers:
                shape = (num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
                layer.k_cache = torch.zeros(shape, dtype=weight.dtype, device=self.device)
                layer.v_cache = torch.zeros(shape, dtype=weight.dtype, device=self.device)
        # Hand blocks out in a scrambled order, so block tables are neither contiguous nor sorted.
        self.free_blocks = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).tolist()
        self.lengths: dict[int, int] = {}
        self.blocks: dict[int, list[int]] = {}

    def step(self, new_tokens: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """Feed each sequence its new tokens in one batch; returns each sequence's logits [new, vocab]."""
        ids, positions, slots, tables, query_lens, seq_lens = [], [], [], [], [], []
        for seq, tokens in new_tokens.items():
            start = self.lengths.get(seq, 0)
            blocks = self.blocks.setdefault(seq, [])
            for pos in range(start, start + len(tokens)):
                if pos // self.block_size == len(blocks):
                    blocks.append(self.free_blocks.pop())
                slots.append(blocks[pos // self.block_size] * self.block_size + pos % self.block_size)
            ids += tokens
            positions += range(start, start + len(tokens))
            self.lengths[seq] = start + len(tokens)
            tables.append(blocks)
            query_lens.append(len(tokens))
            seq_lens.append(self.lengths[seq])
        width = max(len(t) for t in tables)
        cu = [0]
        for n in query_lens:
            cu.append(cu[-1] + n)
        dev = self.device
        padded_tables = [t + [-1] * (width - len(t)) for t in tables]
        meta = AttentionMetadata(
            is_prefill=any(n != 1 for n in query_lens),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(padded_tables, dtype=torch.int32, device=dev),
            query_lens_list=query_lens,
            seq_lens_list=seq_lens,
            block_size=self.block_size,
        )
        with torch.no_grad():
            hidden = self.model(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), meta)
            logits = self.model.compute_logits(hidden)
        return dict(zip(new_tokens, logits.split(query_lens), strict=True))


def paged_logits(model: nn.Module, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Logits of every position of three sequences fed the way a continuous-batching engine feeds them.

    Step 1 prefills the first two sequences' prompts together; step 2 mixes a decode (seq 0), a chunked
    prefill continuation (seq 1) and a new prefill (seq 2); then all decode one token per step.
    """
    assert len(seqs) == 3 and all(len(s) >= 8 for s in seqs)
    run = PagedRun(model)
    fed = [0, 0, 0]
    out: list[list[torch.Tensor]] = [[], [], []]

    def feed(counts: dict[int, int]) -> None:
        new = {i: seqs[i][fed[i] : fed[i] + n] for i, n in counts.items() if n}
        for i, logits in run.step(new).items():
            out[i].append(logits)
            fed[i] += len(new[i])

    feed({0: 5, 1: 4})
    feed({0: 1, 1: 3, 2: 4})
    while any(fed[i] < len(seqs[i]) for i in range(3)):
        feed({i: 1 for i in range(3) if fed[i] < len(seqs[i])})
    return [torch.cat(parts) for parts in out]


def prefill_logits_without_cache(model: nn.Module, seqs: list[list[int]]) -> list[torch.Tensor]:
    """One batched prefill before any KV cache exists (the model runner's profiling run)."""
    run = PagedRun(model, with_cache=False)
    logits = run.step(dict(enumerate(seqs)))
    return [logits[i] for i in range(len(seqs))]


def load_hf(model_dir: str, dtype: torch.dtype = torch.float64) -> nn.Module:
    """The transformers reference, as it computes in float64 with two adjustments:

    - MoE experts run transformers' eager loop (its default grouped kernel has no float64);
    - Gemma 2 runs transformers' eager attention but with the softmax in float64: transformers rounds it to
      float32 even in float64 runs, so its own cached and uncached logits differ by ~1e-7 (the sum of a
      float32 softmax depends on the row length), which would hide real errors at the 1e-12 tolerance.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs: dict = {}
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if any(name in config.model_type for name in ("moe", "mixtral", "gpt_oss")):
        kwargs["experts_implementation"] = "eager"
    if config.model_type == "gemma2":
        _register_gemma2_float64_softmax()
        kwargs["attn_implementation"] = "gemma2_float64_softmax"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True, **kwargs)
    return model.eval()


def _register_gemma2_float64_softmax() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
    from transformers.models.gemma2.modeling_gemma2 import repeat_kv

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
        # transformers' Gemma 2 eager_attention_forward, softmax in the activations' dtype.
        key = repeat_kv(key, module.num_key_value_groups)
        value = repeat_kv(value, module.num_key_value_groups)
        weights = torch.matmul(query, key.transpose(2, 3)) * scaling
        if softcap is not None:
            weights = torch.tanh(weights / softcap) * softcap
        if attention_mask is not None:
            weights = weights + attention_mask
        weights = torch.nn.functional.softmax(weights, dim=-1)
        return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights

    AttentionInterface.register("gemma2_float64_softmax", attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("gemma2_float64_softmax", eager_mask)


def hf_logits(hf_model: nn.Module, seq: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([seq])).logits[0]


def sequences(vocab_size: int, lengths: tuple[int, ...] = (13, 9, 11), seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in lengths]


# The OCP Microscaling FP4 (E2M1) values, by 4-bit code.
FP4_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def make_mxfp4_gpt_oss(base, seed: int = 0):
    """(MXFP4 checkpoint, the same weights dequantised as a float checkpoint transformers loads) for gpt-oss.

    Expert weights are random FP4 codes and E8M0 scales; the reference dequantises them by the MX spec
    (code value * 2**(scale - 127), low nibble first), written independently of the loader under test.
    """
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from tprun.demo_model import make_demo_model

    ref = make_demo_model(Path(base) / "reference", arch="gpt_oss", seed=seed, intermediate_size=96)
    mx = Path(base) / "mxfp4"
    shutil.copytree(ref, mx)
    tensors = load_file(str(ref / "model.safetensors"))
    packed, gen = dict(tensors), torch.Generator().manual_seed(seed)
    lut = torch.tensor(FP4_E2M1, dtype=torch.float32)
    for key in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        e, in_features, out_features = tensors[key].shape
        blocks = torch.randint(0, 256, (e, out_features, in_features // 32, 16), generator=gen, dtype=torch.uint8)
        scales = torch.randint(122, 128, (e, out_features, in_features // 32), generator=gen, dtype=torch.uint8)
        codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).reshape(e, out_features, in_features // 32, 32)
        values = lut[codes.long()] * torch.exp2(scales.float() - 127)[..., None]
        tensors[key] = values.reshape(e, out_features, in_features).transpose(1, 2).contiguous()
        del packed[key]
        packed[f"{key}_blocks"], packed[f"{key}_scales"] = blocks, scales
    save_file(tensors, str(ref / "model.safetensors"), metadata={"format": "pt"})
    save_file(packed, str(mx / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((mx / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (mx / "config.json").write_text(json.dumps(config))
    return mx, ref
