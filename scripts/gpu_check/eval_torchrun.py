"""Part `eval_torchrun`: `python -m src.eval` in one process and under `torchrun` (NCCL on GPUs,
one process per GPU, each on the GPU of its LOCAL_RANK; gloo on 2 CPU processes in the dry
run): the same samples and scores, rank 0 writing the files."""

from __future__ import annotations

import json
import shutil
import time

from gpu_check.common import Context, child_env, free_port, run_command
from gpu_check.zero_e2e import ZERO_SHAPE, ZERO_SHAPE_CPU, make_pretrained

LIMIT = {"gpu": 16, "cpu": 4}


def eval_torchrun(ctx: Context) -> None:
    import torch

    from src.model import MASK_TOKEN, build_model, ensure_mask_token, load_tokenizer, save_export

    mode = "cpu" if ctx.cpu else "gpu"
    # NCCL refuses two ranks on one GPU: one process per GPU, at most 2.
    nproc = 2 if ctx.cpu else min(2, torch.cuda.device_count())
    ctx.record("processes", nproc)
    ctx.record("backend", "gloo" if ctx.cpu else "nccl")
    if nproc < 2:
        ctx.record("note", "one GPU: torchrun runs one process, no NCCL collective is made")

    # An export of a random model (decoding and scoring need no trained weights).
    shape = ZERO_SHAPE_CPU if ctx.cpu else ZERO_SHAPE
    pretrained, export = ctx.work / "pretrained", ctx.work / "export"
    make_pretrained(pretrained, shape, tied=True, tokenizer_cache=ctx.work / "tok")
    tokenizer = load_tokenizer(str(pretrained))
    mask_id = ensure_mask_token(tokenizer)
    model = build_model(tokenizer, pretrained=str(pretrained))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    settings = {
        "objective": "block_diffusion",
        "block_size": 32,
        "mask_token": MASK_TOKEN,
        "mask_token_id": mask_id,
        "stop_token": "<|im_end|>",
        "stop_token_id": im_end,
        "token_shift": True,
    }
    save_export(model, tokenizer, settings, str(export))

    args = [
        "-m",
        "src.eval",
        f"ckpt={export}",
        "benchmark=synthetic",
        f"limit={LIMIT[mode]}",
        "batch_size=4",
        "decode.max_new_tokens=32",
        "logger=none",
    ]
    env = child_env({"CUDA_VISIBLE_DEVICES": ""} if ctx.cpu else None)
    runs = {"one": ctx.work / "one", "torchrun": ctx.work / "torchrun"}
    for folder in runs.values():
        shutil.rmtree(folder, ignore_errors=True)
    seconds = {}
    started = time.monotonic()
    run_command(ctx, "eval", [*args, f"hydra.run.dir={runs['one']}"], env)
    seconds["one"] = round(time.monotonic() - started, 2)
    torchrun = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    torchrun += ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    started = time.monotonic()
    output = run_command(
        ctx, "torchrun eval", [*torchrun, *args, f"hydra.run.dir={runs['torchrun']}"], env
    )
    seconds["torchrun"] = round(time.monotonic() - started, 2)
    ctx.record("seconds", seconds)
    metrics = {k: json.loads((d / "metrics.json").read_text()) for k, d in runs.items()}
    same = {
        key: metrics["one"][key] == metrics["torchrun"][key]
        for key in ("accuracy", "num_scored", "tokens", "decode")
    }
    samples_same = (runs["one"] / "samples.jsonl").read_text() == (
        runs["torchrun"] / "samples.jsonl"
    ).read_text()
    ctx.record(
        "compare",
        {
            "same": same,
            "samples_same": samples_same,
            "processes": [metrics[k]["processes"] for k in runs],
            "device": [metrics[k]["device"] for k in runs],
            "printed_once": output.count("metrics:") == 1,
        },
    )
    for key in ("accuracy", "tokens_per_second", "tokens_per_forward", "num_scored"):
        ctx.record(key, {k: metrics[k].get(key) for k in runs})
    if not (all(same.values()) and samples_same):
        raise RuntimeError(f"torchrun's evaluation differs from one process's: {same}")
    if metrics["torchrun"]["processes"] != nproc:
        raise RuntimeError(
            f"torchrun ran {metrics['torchrun']['processes']} processes, not {nproc}"
        )
