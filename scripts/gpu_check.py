"""One prepared GPU check of the pipeline: every part in its own subprocess, under its own
timeout, writing `$OUT/<part>.json` (entry: `scripts/gpu_check.sh`, which installs the carried
wheels first; what it measures and how to run it on the device: `scripts/README.md`). This file
is the command line and the orchestrator; the parts live in the package `scripts/gpu_check/`.

    bash scripts/gpu_check.sh                 # CUDA: real shapes (one H200, about 5 minutes)
    bash scripts/gpu_check.sh --cpu           # dry run of every code path on tiny shapes
    python scripts/gpu_check.py --table DIR   # the markdown tables of a results folder

Parts (`--parts a,b` runs a subset):

- `zero2_e2e`: `python -m src.train` with Lightning's DeepSpeedStrategy (ZeRO-2, bf16) on a
  small random Qwen2 saved with `save_pretrained` and loaded with `model=hf`: N steps with
  `callbacks=decode_eval`, checkpoints, a second run in the same run directory that resumes
  from `last.ckpt`, the HF export written at the end of fit, then `python -m src.zero_to_hf`
  on `last.ckpt`, and the two exports' logits compared.
- `zero3_e2e`: the cluster path (ZeRO-3, bf16, gradient accumulation 4, `callbacks=decode_eval`):
  an uninterrupted run, and one that gets SLURM's signal mid-accumulation-window and is started
  again in its run directory; where the preemption checkpoint was taken, both loss curves,
  retention and `last.ckpt`, and the HF export against `python -m src.zero_to_hf`.
- `eval_torchrun`: `python -m src.eval` in one process and under `torchrun` (NCCL, one
  process per GPU, at most 2): the same samples and scores.
  With `--cpu` every part runs on CPU: DeepSpeed on a CPU rank (32-true), gloo for torchrun.
- `train_step_7b`: one block-diffusion training step (forward + backward; no optimizer step)
  of a 7B-shaped random Qwen2 in bf16 with gradient checkpointing at L = 2048 (3L = 6144
  tokens through the model) against an AR step on the same batch: time, peak memory,
  gradient norm and that every gradient is finite.
- `decode`: 1.5B- and 7B-shaped random models in bf16, batch 1 and 8: ms per forward and
  tokens/s of cached parallel decoding forced to 1, 8 and 32 tokens per denoising forward, of
  self-verified decoding with the random model's drafts and with every draft accepted (two
  caches and one), and ms per token of the AR baseline (`generate_ar`).
- `attention`: `sdpa` vs `flex_attention` on a 1.5B-shaped model: the same logits and loss,
  training step time and peak memory, decode ms per forward.

Each JSON holds `status` (ok / failed / skipped), `error`, `results` (the numbers), `seconds`,
`timeout_s`, the torch / transformers / lightning / deepspeed versions and the device. A part
that times out or crashes keeps the numbers it had recorded. The run exits non-zero when any
part failed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for path in (str(ROOT), str(ROOT / "scripts")):
    if path not in sys.path:
        sys.path.insert(0, path)

from gpu_check import PARTS  # noqa: E402 (the package beside this file)
from gpu_check.common import (  # noqa: E402
    Part,
    child_env,
    read_json,
    run_part_here,
    versions,
    write_json,
)
from gpu_check.tables import tables  # noqa: E402

DEFAULT_OUT = "gpu_check_out"
# The whole run on the device must end inside one 10-minute call (wheel install included).
DEFAULT_BUDGET_S = {"gpu": 480, "cpu": 480}
# Below this many seconds left, a part is not started at all.
MIN_PART_S = 20
# Modules every part needs (the import check names the first one missing); DeepSpeed on CUDA only.
NEEDED_MODULES = [
    "torch",
    "transformers",
    "lightning",
    "hydra",
    "omegaconf",
    "deepspeed",
    "src.train",
    "src.zero_to_hf",
    "src.training.decode_eval",
    "src.decoding",
    "src.diffusion",
]


def check_imports() -> int:
    """Import everything the parts need; one line naming the first missing module."""
    for name in NEEDED_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            print(
                f"gpu_check: missing Python module {err.name!r} (importing {name}): carry its "
                "wheel in .whl/ (scripts/README.md lists the commands)",
                file=sys.stderr,
            )
            return 1
    return 0


def kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@dataclass
class Running:
    part: Part
    process: subprocess.Popen
    log: Any
    started: float
    timeout: float


def start_part(
    part: Part, args: argparse.Namespace, out: Path, work: Path, timeout: float
) -> Running:
    log = tempfile.TemporaryFile(mode="w+")
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--part",
        part.name,
        "--out",
        str(out),
        "--work",
        str(work),
        "--timeout",
        str(int(timeout)),
    ] + (["--cpu"] if args.cpu else [])
    # The dry run: tiny tensors, where one thread beats several fighting over busy cores.
    env = child_env({"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"} if args.cpu else None)
    if not args.cpu:
        env.setdefault("DS_ACCELERATOR", "cuda")
    print(f"gpu_check: {part.name} (timeout {timeout:.0f}s)", flush=True)
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    return Running(part, process, log, time.monotonic(), timeout)


def finish_part(running: Running, out: Path, log_file: Any) -> dict[str, Any]:
    """Wait for the part (killing its process group at the timeout); its final report."""
    timed_out = False
    try:
        left = running.timeout - (time.monotonic() - running.started)
        running.process.wait(timeout=max(left, 0.1))
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_group(running.process)
    seconds = time.monotonic() - running.started
    running.log.seek(0)
    output = running.log.read()
    running.log.close()
    name = running.part.name
    log_file.write(f"\n===== {name} (exit {running.process.returncode}, {seconds:.1f}s) =====\n")
    log_file.write(output)
    log_file.flush()
    path = out / f"{name}.json"
    report = read_json(path) or {
        "part": name,
        "results": {},
        "versions": versions(),
        "timeout_s": running.timeout,
    }
    if timed_out:
        report["status"] = "failed"
        report["error"] = f"timed out after {running.timeout:.0f}s" + (
            f" (last error: {report['error']})" if report.get("error") else ""
        )
    elif running.process.returncode != 0 and report.get("status") != "failed":
        tail = [line for line in output.strip().splitlines() if line.strip()][-3:]
        report["status"] = "failed"
        report["error"] = f"exit {running.process.returncode}: {' | '.join(tail)}"
    report["seconds"] = round(seconds, 2)
    write_json(path, report)
    print(f"gpu_check: {name}: {report['status']} in {seconds:.1f}s", flush=True)
    if report.get("error"):
        print(f"gpu_check: {name}: {report['error']}", flush=True)
    return report


def write_placeholder(out: Path, part: Part, status: str, error: str, cpu: bool) -> dict:
    report = {
        "part": part.name,
        "mode": "cpu" if cpu else "gpu",
        "status": status,
        "error": error,
        "results": {},
        "seconds": 0.0,
        "timeout_s": part.timeout_s["cpu" if cpu else "gpu"],
        "versions": versions(),
    }
    write_json(out / f"{part.name}.json", report)
    print(f"gpu_check: {part.name}: {error}", flush=True)
    return report


def orchestrate(args: argparse.Namespace) -> int:
    mode = "cpu" if args.cpu else "gpu"
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_work_"))
    work.mkdir(parents=True, exist_ok=True)
    names = args.parts.split(",") if args.parts else list(PARTS)
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        print(f"gpu_check: unknown parts {unknown}; choose from {list(PARTS)}", file=sys.stderr)
        return 2
    budget = args.budget or DEFAULT_BUDGET_S[mode]
    started = time.monotonic()
    reports: dict[str, dict[str, Any]] = {}
    log_file = open(out / "gpu_check.log", "w")  # noqa: SIM115 (closed below)

    def timeout_for(part: Part) -> float:
        return min(part.timeout_s[mode], budget - (time.monotonic() - started))

    todo = [PARTS[n] for n in names]
    # On CUDA the parallel parts (small models, mostly process start-up) share the GPU first;
    # the timed parts then run one at a time on an otherwise idle GPU.
    batches: list[list[Part]] = []
    parallel = [p for p in todo if p.parallel and not args.cpu]
    if parallel:
        batches.append(parallel)
    batches += [[p] for p in todo if p not in parallel]
    for batch in batches:
        running = []
        for part in batch:
            timeout = timeout_for(part)
            if timeout < MIN_PART_S:
                reports[part.name] = write_placeholder(
                    out, part, "failed", f"not run: the {budget}s budget was used up", args.cpu
                )
                continue
            running.append(start_part(part, args, out, work, timeout))
        for r in running:
            reports[r.part.name] = finish_part(r, out, log_file)
    log_file.close()
    seconds = time.monotonic() - started
    failed = [n for n, r in reports.items() if r["status"] == "failed"]
    summary = {
        "mode": mode,
        "seconds": round(seconds, 1),
        "budget_s": budget,
        "status": {n: r["status"] for n, r in reports.items()},
        "errors": {n: r["error"] for n, r in reports.items() if r.get("error")},
        "failed": failed,
        "versions": versions(),
        # The markdown tables (`--table DIR` prints them again): at most 8 files come back
        # from the device, the parts' JSONs, this file and the log.
        "table_md": tables(out),
    }
    write_json(out / "summary.json", summary)
    if not args.keep_work and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(tables(out))
    print(
        f"gpu_check: {len(reports) - len(failed)}/{len(reports)} parts not failed, "
        f"{seconds:.0f}s; results in {out}"
    )
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="dry run on tiny shapes, no CUDA")
    parser.add_argument("--out", default=os.environ.get("OUT") or DEFAULT_OUT)
    parser.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--keep-work", action="store_true", help="keep the default scratch dir")
    parser.add_argument("--parts", default=None, help=f"comma-separated subset of {list(PARTS)}")
    parser.add_argument("--budget", type=float, default=None, help="seconds for all parts")
    parser.add_argument("--check-imports", action="store_true", help="only check the imports")
    parser.add_argument("--table", metavar="DIR", help="print the tables of a results folder")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table:
        print(tables(Path(args.table)))
        return 0
    if args.check_imports:
        return check_imports()
    if args.part:
        part = PARTS[args.part]
        timeout = args.timeout or part.timeout_s["cpu" if args.cpu else "gpu"]
        return run_part_here(part, Path(args.out), Path(args.work), args.cpu, timeout)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
