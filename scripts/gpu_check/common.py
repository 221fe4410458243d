"""What every part of the GPU check shares: its report (`$OUT/<part>.json`), the model shapes,
random models, CUDA timing and memory helpers, and running a command inside a part's timeout."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Part:
    name: str
    run: Callable[..., None]
    timeout_s: dict[str, int]  # by mode: "gpu" / "cpu"
    parallel: bool = False  # on CUDA, runs at the same time as the other parallel parts


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "lightning", "deepspeed", "hydra-core", "datasets"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


class Context:
    """One part's run: where it writes, its mode, its deadline and its report."""

    def __init__(self, name: str, out: Path, work: Path, cpu: bool, timeout_s: float) -> None:
        self.name, self.out, self.work, self.cpu = name, out, work / name, cpu
        self.started = time.monotonic()
        # Inner subprocesses stop a little before the orchestrator would kill the whole part.
        self.deadline = self.started + timeout_s - 5
        self.path = out / f"{name}.json"
        self.report: dict[str, Any] = {
            "part": name,
            "mode": "cpu" if cpu else "gpu",
            "status": "running",
            "error": None,
            "timeout_s": timeout_s,
            "versions": versions(),
            "results": {},
        }
        self.work.mkdir(parents=True, exist_ok=True)

    @property
    def device(self) -> str:
        return "cpu" if self.cpu else "cuda"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def record(self, key: str, value: Any) -> None:
        """Store one result (JSON-able) and rewrite the report at once."""
        self.report["results"][key] = value
        self.save()

    def save(self) -> None:
        self.report["seconds"] = round(time.monotonic() - self.started, 2)
        write_json(self.path, self.report)

    def log(self, message: str) -> None:
        print(f"[{self.name} {time.monotonic() - self.started:6.1f}s] {message}", flush=True)


def device_info(cpu: bool) -> dict[str, Any]:
    import torch

    if cpu or not torch.cuda.is_available():
        return {"name": platform.processor() or platform.machine(), "cuda": None}
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "cuda": torch.version.cuda,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "multiprocessors": props.multi_processor_count,
    }


def run_part_here(part: Part, out: Path, work: Path, cpu: bool, timeout_s: float) -> int:
    """`--part NAME`: run one part in this process and write its report."""
    ctx = Context(part.name, out, work, cpu, timeout_s)
    ctx.save()
    try:
        ctx.report["device"] = device_info(cpu)
        if not cpu:
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError("CUDA is not available: use --cpu for the dry run")
        part.run(ctx)
        ctx.report["status"] = "ok"
    except Exception as err:
        traceback.print_exc()
        ctx.report["status"] = "failed"
        ctx.report["error"] = f"{type(err).__name__}: {err}"[-2000:]
    ctx.save()
    return 0 if ctx.report["status"] == "ok" else 1


def qwen_shape(size: str) -> dict[str, Any]:
    """The Qwen2.5-`size`-Instruct architecture (`"1.5B"`, `"7B"`) as Qwen2Config keywords, from
    the memory plan's built-in copies (src/training/plan.py); the weights here are random."""
    from src.training.plan import KNOWN_ARCHITECTURES

    config = KNOWN_ARCHITECTURES[f"Qwen/Qwen2.5-{size}-Instruct"]
    return {k: v for k, v in config.items() if k != "model_type"}


# The CPU dry run's stand-ins: same code paths, seconds on two cores.
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 1024,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}
TINY_UNTIED = {**TINY, "tie_word_embeddings": False}
# Qwen2.5's mask token id ("|<MASK>|", a spare embedding row); the last row for tiny shapes.
QWEN_MASK_ID = 151665


def mask_id_for(shape: dict[str, Any]) -> int:
    return QWEN_MASK_ID if shape["vocab_size"] > QWEN_MASK_ID else shape["vocab_size"] - 1


def random_model(
    shape: dict[str, Any], device: str, dtype: Any, attn: str = "sdpa", seed: int = 0
) -> Any:
    """A randomly initialised Qwen2 of `shape`, created directly on `device` in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**shape)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def grad_stats(model: Any) -> tuple[float, bool]:
    """(global gradient L2 norm, whether every gradient element is finite)."""
    import torch

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0, False
    finite = bool(torch.stack([g.isfinite().all() for g in grads]).all())
    norm = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])).item()
    return norm, finite


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="offline",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def run_command(ctx: Context, label: str, args: list[str], env: dict[str, str]) -> str:
    """Run `python args...` from the repo root inside the part's deadline; its output goes
    to the part's log and is returned. RuntimeError (naming the command) when it fails."""
    timeout = ctx.left()
    if timeout < 5:
        raise RuntimeError(f"{label}: no time left in the part's timeout")
    ctx.log(f"{label}: python {' '.join(args)}")
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as err:
        output = err.output or ""
        print(output.decode(errors="replace") if isinstance(output, bytes) else output, flush=True)
        raise RuntimeError(f"{label} timed out after {timeout:.0f}s") from None
    print(done.stdout, flush=True)
    ctx.log(f"{label}: exit {done.returncode} after {time.monotonic() - started:.1f}s")
    if done.returncode != 0:
        tail = [line for line in done.stdout.strip().splitlines() if line.strip()][-3:]
        raise RuntimeError(f"{label} exited {done.returncode}: {' | '.join(tail)}")
    return done.stdout
