"""The CUDA path (Triton attention, decode CUDA graphs, batched sampler) against HF transformers on a GPU.

- float32, tiny models of every architecture: greedy tokens equal HF `generate`, with and without graphs
  (the issue-12 families with graphs: fused MoE kernels, soft-capping and sinks in the attention kernels).
- bfloat16, the bench shapes (llama3-8b with 4 of its 32 layers, to stay within a minute): prefill and
  graph-replayed decode logits are as close to a float32 HF reference as HF's own bfloat16 logits are.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("the CUDA path needs a CUDA device (CI has none; run these on the GPU machine)",
                allow_module_level=True)

from tests.engine_prompts import PROMPT_LENGTHS, make_prompts, make_shared_prefix_prompts  # noqa: E402

pytestmark = pytest.mark.gpu

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
NEW_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "gemma2", "gemma3", "phi3"]


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory) -> dict[str, str]:
    from tprun.demo_model import make_demo_model

    base = tmp_path_factory.mktemp("models")
    # A sliding window shorter than the longest prompt, so the window path of the kernels runs too.
    extra = {"mistral": {"sliding_window": 16}}
    return {a: str(make_demo_model(base / a, arch=a, seed=7, **extra.get(a, {}))) for a in ARCHS + NEW_ARCHS}


def hf_greedy_gpu(model_dir: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs: dict = {}
    model_type = AutoConfig.from_pretrained(model_dir, local_files_only=True).model_type
    if model_type in ("gemma2", "gpt_oss"):  # soft-capping and sinks: transformers' eager attention has them
        kwargs["attn_implementation"] = "eager"
    if any(name in model_type for name in ("moe", "mixtral", "gpt_oss")):  # its float32 experts loop
        kwargs["experts_implementation"] = "eager"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True,
                                                 **kwargs).cuda()
    # ignore_eos on both sides: no EOS stop (min_new_tokens would instead forbid EOS, changing the argmax).
    model.generation_config.eos_token_id = None
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=0)
            outs.append(gen[0, len(p):].tolist())
    del model
    return outs


def tprun_generate(model_dir: str, prompts, params, **kwargs) -> list[list[int]]:
    from tprun import LLM

    with LLM(model=model_dir, dtype=kwargs.pop("dtype", "float32"), device="cuda",
             distributed_executor_backend="uni", kv_cache_memory=1 << 30, max_num_seqs=16, **kwargs) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    gc.collect()
    torch.cuda.empty_cache()
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("eager", [False, True], ids=["cuda-graphs", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_match_hf_float32_on_gpu(arch, eager, demo_models):
    from tprun import SamplingParams

    prompts = make_prompts(331, PROMPT_LENGTHS)
    expected = hf_greedy_gpu(demo_models[arch], prompts, 24)
    got = tprun_generate(demo_models[arch], prompts,
                         SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), enforce_eager=eager)
    assert got == expected


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_new_families_greedy_tokens_match_hf_float32_with_cuda_graphs(arch, demo_models):
    from tprun import SamplingParams

    prompts = make_prompts(331, PROMPT_LENGTHS)
    expected = hf_greedy_gpu(demo_models[arch], prompts, 24)
    got = tprun_generate(demo_models[arch], prompts,
                         SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    assert got == expected


def test_kv_cache_too_small_preempts_and_still_matches_hf(demo_models):
    from tprun import SamplingParams

    prompts = make_prompts(331, PROMPT_LENGTHS)
    expected = hf_greedy_gpu(demo_models["qwen3"], prompts, 24)
    got = tprun_generate(demo_models["qwen3"], prompts, SamplingParams(temperature=0.0, max_tokens=24,
                                                                       ignore_eos=True),
                         num_gpu_blocks_override=12, block_size=8)
    assert got == expected


@pytest.mark.parametrize("arch", ["llama", "mistral"])  # mistral: the sliding window over a cached prefix
def test_chunked_prefill_and_prefix_caching_match_hf_on_gpu(arch, demo_models):
    from tprun import SamplingParams

    # Steps of 16 tokens mix decodes with prompt chunks (the varlen kernel with a cached prefix); the
    # prompts share prefixes and the 12-block cache forces eviction and preemption.
    prompts = make_shared_prefix_prompts(331)
    expected = hf_greedy_gpu(demo_models[arch], prompts, 24)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    for caching in (True, False):
        got = tprun_generate(demo_models[arch], prompts, params, max_num_batched_tokens=16, block_size=8,
                             num_gpu_blocks_override=12, enable_prefix_caching=caching)
        assert got == expected, f"enable_prefix_caching={caching}"


def test_seeded_sampling_on_gpu_repeats_and_mixes_with_greedy(demo_models):
    from tprun import SamplingParams

    prompts = make_prompts(331, PROMPT_LENGTHS)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=16, ignore_eos=True, seed=3)
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    mixed = [sampled if i % 2 else greedy for i in range(len(prompts))]
    first = tprun_generate(demo_models["llama"], prompts, mixed)
    second = tprun_generate(demo_models["llama"], prompts, mixed)
    alone = tprun_generate(demo_models["llama"], prompts[1:2], [sampled])
    assert first == second
    assert first[1] == alone[0], "a request's samples must not depend on its batch-mates"
    all_greedy = tprun_generate(demo_models["llama"], prompts, greedy)
    assert [first[i] for i in range(0, len(prompts), 2)] == [all_greedy[i] for i in range(0, len(prompts), 2)]
    assert any(first[i] != all_greedy[i] for i in range(1, len(prompts), 2)), "sampling changed nothing"


# ------------------------------------------------------------------------------ bf16, bench shapes
def runner_logits(model_dir: Path, prompts: list[list[int]], continuations: list[list[int]]) -> list[torch.Tensor]:
    """tprun's next-token logits: the prefill's last position, then one per teacher-forced decode step
    (replayed from CUDA graphs: 3 sequences pad to the captured size 4). Each [num_seqs, vocab]."""
    from tprun.worker.model_runner import ModelRunner
    from tprun.worker.parallel import TPGroup
    from tprun.worker.step import SamplingOptions, SeqStep, StepInput
    from tprun.worker.worker import load_hf_config

    block = 16
    runner = ModelRunner(str(model_dir), load_hf_config(str(model_dir)), TPGroup(), torch.bfloat16,
                         torch.device("cuda"), block, max_model_len=1024, max_num_batched_tokens=2048,
                         max_num_seqs=8)
    lengths = [len(p) + len(c) for p, c in zip(prompts, continuations)]
    pages = torch.randperm(sum(-(-n // block) for n in lengths)).tolist()
    tables = [[pages.pop() for _ in range(-(-n // block))] for n in lengths]
    runner.allocate_kv_cache(sum(len(t) for t in tables) + 1)
    assert runner.graphs, "decode graphs were not captured"
    opts = SamplingOptions(0.0, 1.0, -1, 1, 0, frozenset(), True)
    steps = [StepInput([SeqStep(i, p, 0, tables[i], opts) for i, p in enumerate(prompts)], True)]
    for j in range(len(continuations[0])):
        steps.append(StepInput([SeqStep(i, [c[j]], len(prompts[i]) + j, tables[i], opts)
                                for i, c in enumerate(continuations)], False))
    out = [runner.compute_logits(s).float().cpu() for s in steps]
    del runner
    gc.collect()
    torch.cuda.empty_cache()
    return out


def hf_logits(model_dir: Path, dtype: torch.dtype, prompts, continuations) -> list[torch.Tensor]:
    """HF's logits at the same positions, one full forward per sequence."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True,
                                                 attn_implementation="sdpa").cuda()
    per_seq = []
    with torch.no_grad():
        for p, c in zip(prompts, continuations):
            logits = model(torch.tensor([p + c], device="cuda")).logits[0].float().cpu()
            per_seq.append(logits[len(p) - 1:])  # prefill's last position, then each decode step's
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return [torch.stack([s[j] for s in per_seq]) for j in range(per_seq[0].shape[0])]


@pytest.mark.parametrize("shape,overrides", [("qwen3-0.6b", {}), ("llama3-8b", {"num_hidden_layers": 4})],
                         ids=["qwen3-0.6b", "llama3-8b-4-layers"])
def test_bf16_logits_on_bench_shapes_are_as_close_to_float32_as_hf_bf16(shape, overrides, tmp_path_factory):
    from models import make_bench_model

    model_dir = make_bench_model(shape, tmp_path_factory.mktemp(shape), torch.bfloat16, "cuda", seed=1,
                                 **overrides)
    gen = torch.Generator().manual_seed(5)
    vocab = 128256 if shape == "llama3-8b" else 151936
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (7, 300, 129)]
    continuations = [torch.randint(0, vocab, (6,), generator=gen).tolist() for _ in prompts]
    ours = runner_logits(model_dir, prompts, continuations)
    truth = hf_logits(model_dir, torch.float32, prompts, continuations)
    theirs = hf_logits(model_dir, torch.bfloat16, prompts, continuations)
    for step, (o, t, h) in enumerate(zip(ours, truth, theirs)):
        err = ((o - t).norm() / t.norm()).item()
        hf_err = ((h - t).norm() / t.norm()).item()
        print(f"{shape} step {step}: tprun bf16 {err:.2e}, HF bf16 {hf_err:.2e} (vs float32)")
        assert err < max(2 * hf_err, 1e-2), f"step {step}: tprun {err:.2e} vs HF bf16 {hf_err:.2e}"
