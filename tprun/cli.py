"""tprun run | env | render | submit | demo-model"""

from __future__ import annotations

import argparse
import json
import signal
import sys


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="run a job (alone, or one process of torchrun/srun/a pod)")
    p.add_argument("spec", nargs="?", help="job spec YAML; flags below override its fields")
    p.add_argument("--model")
    p.add_argument("--input")
    p.add_argument("--output")
    p.add_argument("--tp", type=int, help="tensor-parallel size")
    p.add_argument("--dp", type=int, help="data-parallel size")
    _groups_flag(p)
    p.add_argument("--group-index", type=int, help="--groups independent under torchrun: this group's index "
                   "(for logs and summary; Slurm arrays and LeaderWorkerSets give it themselves)")
    p.add_argument("--lease-timeout", type=float, help="--groups independent: seconds before another group "
                   "takes over a chunk whose lease nobody renewed (default 120)")
    p.add_argument("--dtype", choices=["auto", "float32", "float64", "bfloat16", "float16"])
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int, help="job seed (engine seed; per-record seeds derive from it)")
    p.add_argument("--ignore-eos", action="store_true", default=None)
    p.add_argument("--chunk-size", type=int)
    p.add_argument("--on-bad-input", choices=["skip", "fail"])
    p.add_argument("--input-format", choices=["auto", "openai", "tprun"],
                   help="input lines: tprun records or OpenAI Batch API requests (default auto: the first line decides)")
    p.add_argument("--overwrite", action="store_true", help="replace results of a different job in OUTPUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar (for log files)")
    p.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                   help="extra engine setting, e.g. --engine kv_cache_memory=1000000 (repeatable)")


def _groups_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--groups", choices=["one-world", "independent"],
                   help="one-world: one rendezvous of tp x dp processes; independent: each TP group runs on its "
                        "own (Slurm array task, LeaderWorkerSet replica), sharing only the output directory")


def build_spec(args: argparse.Namespace):
    """The spec file (if any) with every given flag laid over it."""
    from tprun.config import JobSpec

    data: dict = {}
    if args.spec:
        data = JobSpec.from_yaml(args.spec).model_dump(exclude_unset=True)
    for flag, key in (("model", "model"), ("input", "input"), ("output", "output"), ("dtype", "dtype"),
                      ("chunk_size", "chunk_size"), ("on_bad_input", "on_bad_input"),
                      ("input_format", "input_format"), ("lease_timeout", "lease_timeout_s")):
        if getattr(args, flag) is not None:
            data[key] = getattr(args, flag)
    parallel = data.setdefault("parallel", {})
    if args.tp is not None:
        parallel["tensor_parallel_size"] = args.tp
    if args.dp is not None:
        parallel["data_parallel_size"] = args.dp
    if args.groups is not None:
        parallel["groups"] = args.groups
    sampling = data.setdefault("sampling", {})
    for flag in ("max_tokens", "temperature", "top_p", "top_k", "ignore_eos"):
        if getattr(args, flag) is not None:
            sampling[flag] = getattr(args, flag)
    engine = data.setdefault("engine", {})
    if args.seed is not None:
        engine["seed"] = args.seed
    for item in args.engine:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--engine takes KEY=VALUE, got {item!r}")
        engine[key] = _scalar(value)
    missing = [k for k in ("model", "input", "output") if k not in data]
    if missing:
        raise ValueError("missing " + ", ".join(f"--{k}" for k in missing)
                         + " (give them as flags or in the spec file)")
    return JobSpec.model_validate(data)


def _scalar(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # not YAML (e.g. an unbalanced bracket): the text itself, for the spec to judge


def cmd_run(args) -> int:
    spec = build_spec(args)
    if args.group_index is not None:
        import os

        os.environ["TPRUN_GROUP_INDEX"] = str(args.group_index)
    from tprun.runner.job import run_job
    from tprun.runner.signals import STOP_SIGNALS

    # run_job handles stop signals while it runs and then restores these: once it has returned, the
    # process only tears down, and a late stop signal must not turn its exit code into a signal death.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    return run_job(spec, overwrite=args.overwrite, quiet=args.quiet)


def cmd_env(args) -> int:
    from tprun.launchers import LauncherError, detect_launcher

    try:
        info = detect_launcher().distributed_args().as_dict()
    except LauncherError as e:
        print(f"tprun env: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, sort_keys=True))
    else:
        for k, v in sorted(info.items()):
            print(f"{k}={v}")
    return 0


def cmd_render(args) -> int:
    from tprun.config import JobSpec

    spec = with_groups(JobSpec.from_yaml(args.spec), args.groups)
    spec.check()
    if args.target == "slurm":
        from tprun.cluster.slurm_render import render_sbatch

        sys.stdout.write(render_sbatch(spec, args.spec))
    else:
        from tprun.cluster.k8s_render import manifests_yaml

        sys.stdout.write(manifests_yaml(spec))
    return 0


def with_groups(spec, groups: str | None):
    if groups is None:
        return spec
    return type(spec).model_validate({**spec.model_dump(), "parallel": {**spec.parallel.model_dump(),
                                                                        "groups": groups}})


def cmd_submit(args) -> int:
    from tprun.config import JobSpec
    from tprun.submit import submit

    spec = args.spec if args.groups is None else with_groups(JobSpec.from_yaml(args.spec), args.groups)
    handle = submit(spec, backend="slurm" if args.target == "slurm" else "kubernetes")
    print(f"submitted {args.target} job {handle.job_id}")
    if not args.wait:
        return 0
    state = handle.wait(timeout=args.timeout)
    print(f"job {handle.job_id}: {state}")
    return 0 if state == "COMPLETED" else 1


def cmd_demo_model(args) -> int:
    from tprun.demo_model import make_demo_model

    path = make_demo_model(args.dir, arch=args.arch, seed=args.seed)
    print(f"demo {args.arch} checkpoint written to {path}")
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tprun", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    p = sub.add_parser("env", help="what the launcher adapters detect here (no rendezvous)")
    p.add_argument("--json", action="store_true")
    for name, helptext in (("render", "print the sbatch script or Kubernetes manifests (dry run)"),
                           ("submit", "submit the job to Slurm (submitit) or Kubernetes")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("target", choices=["slurm", "k8s"])
        p.add_argument("spec", help="job spec YAML")
        _groups_flag(p)
        if name == "submit":
            p.add_argument("--wait", action="store_true", help="wait until the job ends")
            p.add_argument("--timeout", type=float, default=None, help="seconds to wait at most")
    p = sub.add_parser("demo-model", help="write a tiny random checkpoint with an offline tokenizer")
    p.add_argument("dir")
    p.add_argument("--arch", default="llama", choices=["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe",
                                                       "qwen3_moe", "gpt_oss", "gemma2", "gemma3", "phi3"])
    p.add_argument("--seed", type=int, default=0)
    return ap


COMMANDS = {"run": cmd_run, "env": cmd_env, "render": cmd_render, "submit": cmd_submit,
            "demo-model": cmd_demo_model}


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    from tprun.config import validation_summary

    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ValidationError as e:  # a job spec or flag that is not valid: one line naming every field
        print(f"tprun {args.command}: invalid job: {validation_summary(e)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, ValueError) as e:
        print(f"tprun {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
