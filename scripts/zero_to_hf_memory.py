"""Peak host memory of `python -m src.zero_to_hf` on a real ZeRO-3 checkpoint, against the path it
replaced (the pretrained model loaded in fp32 from its source, then overwritten by the whole
consolidated fp32 state dict).

    python scripts/zero_to_hf_memory.py                   # tiny and 1B-shaped, ~10 GB RAM at most
    python scripts/zero_to_hf_memory.py --shapes tiny     # seconds
    python scripts/zero_to_hf_memory.py --shapes 1b --work /tmp/z2hf

For each shape: a random Qwen2 saved like a hub model (bf16), a ZeRO-3 checkpoint of it written
by 2 gloo ranks through `DiffusionLM.configure_model` + `deepspeed.initialize` (bf16, the fp32
master weights in the optimizer shards; no optimizer step, so no Adam moments), then each
conversion in its own process: peak RSS (VmHWM: it counts the checkpoint's memory-mapped pages,
which the kernel can drop) and peak anonymous memory (RssAnon, sampled every 10 ms: what must
fit in RAM). Memory figures do not depend on the machine's load; the seconds do.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "tiny": dict(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    # ~1.07B parameters with the synthetic tokenizer's vocabulary padded to 32768.
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=8,
        tie_word_embeddings=True,
        vocab_size=32768,
    ),
}
GIB = 2**30


def make_pretrained(folder: Path, shape: dict) -> int:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from src.data.tokenizer import synthetic_tokenizer

    tokenizer = synthetic_tokenizer(folder.parent / "tokenizer")
    config = Qwen2Config(**{"vocab_size": len(tokenizer), **shape, "max_position_embeddings": 512})
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checkpoint_rank(rank: int, port: int, pretrained: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
    )
    import deepspeed
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from transformers.integrations import HfDeepSpeedConfig

    from src.model import load_tokenizer
    from src.training.module import DiffusionLM
    from src.training.zero import deepspeed_config

    torch.set_num_threads(1)
    deepspeed.init_distributed("gloo")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            [
                "strategy=deepspeed_zero3",
                "model=hf",
                f"model.pretrained={pretrained}",
                "data.batch_size=1",
                "trainer.strategy.config.zero_optimization.stage3_param_persistence_threshold=0",
            ],
        )
    config = deepspeed_config(cfg)
    plain = {
        k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "diffusion", "optim")
    }
    plain["model"]["dtype"] = "bfloat16"  # what `auto` gives under DeepSpeed bf16
    module = DiffusionLM(load_tokenizer(pretrained), **plain)
    # What Lightning's strategy gives configure_model: transformers loads into ZeRO-3 shards
    # only while an HfDeepSpeedConfig is alive.
    keep = HfDeepSpeedConfig(config)
    with deepspeed.zero.Init(config_dict_or_path=config):
        module.configure_model()
    optimizer = torch.optim.AdamW(module.model.parameters(), lr=1e-5)
    engine, *_ = deepspeed.initialize(
        model=module, optimizer=optimizer, config=config, dist_init_required=False
    )
    client = {"hyper_parameters": dict(module.hparams), "global_step": 0}
    engine.save_checkpoint(out, client_state=client, tag="checkpoint")
    del keep
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def make_checkpoint(pretrained: Path, out: Path) -> None:
    import torch

    torch.multiprocessing.start_processes(
        _checkpoint_rank,
        args=(free_port(), str(pretrained), str(out)),
        nprocs=2,
        start_method="spawn",
    )


def previous_conversion(checkpoint: str, export: str) -> None:
    """The conversion before this script's change, for comparison: the run's model loaded from
    its pretrained source in fp32, then the consolidated fp32 state dict loaded into it."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from omegaconf import OmegaConf

    from src.model import build_tokenizer, save_export
    from src.training.module import DiffusionLM
    from src.training.zero_export import _checkpoint_client_state

    client = _checkpoint_client_state(checkpoint, None)
    hparams = dict(client["hyper_parameters"])
    hparams.pop("tokenizer_fingerprint", None)
    hparams["model"] = {**hparams["model"], "dtype": "float32"}
    tokenizer = build_tokenizer(OmegaConf.create(hparams["model"]))
    module = DiffusionLM(tokenizer, **hparams)
    module.configure_model()
    state = get_fp32_state_dict_from_zero_checkpoint(checkpoint)
    state = {k.removeprefix("_forward_module.").removeprefix("model."): v for k, v in state.items()}
    module.model.load_state_dict(state, strict=True, assign=True)
    save_export(module.model, tokenizer, module.export_settings(), export)


def measure(how: str, checkpoint: str, export: str) -> dict:
    """Run one conversion in this process; its peak memory and time."""
    import torch

    peak_anon = [0]

    def anon_kib() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
        return 0

    def sample() -> None:
        while True:
            peak_anon[0] = max(peak_anon[0], anon_kib())
            time.sleep(0.01)

    baseline = anon_kib()
    threading.Thread(target=sample, daemon=True).start()
    started = time.monotonic()
    if how == "previous":
        previous_conversion(checkpoint, export)
    else:
        from src.training.zero_export import export_lightning_zero_checkpoint

        export_lightning_zero_checkpoint(checkpoint, export, dtype=getattr(torch, how))
    seconds = time.monotonic() - started
    peak_anon[0] = max(peak_anon[0], anon_kib())
    hwm = next(
        int(line.split()[1])
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("VmHWM:")
    )
    size = sum(f.stat().st_size for f in Path(export).glob("*.safetensors"))
    return {
        "peak_rss_gib": hwm * 1024 / GIB,
        "peak_anon_gib": peak_anon[0] * 1024 / GIB,
        "anon_before_gib": baseline * 1024 / GIB,
        "export_gib": size / GIB,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,1b", help="comma-separated: tiny, 1b")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument(
        "--measure", nargs=3, metavar=("HOW", "CKPT", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    work = Path(args.work or tempfile.mkdtemp(prefix="zero_to_hf_memory_"))
    rows = []
    for name in args.shapes.split(","):
        folder = work / name
        params = make_pretrained(folder / "pretrained", SHAPES[name])
        checkpoint = folder / "checkpoint"
        make_checkpoint(folder / "pretrained", checkpoint)
        for how in ("previous", "float32", "bfloat16"):
            out = (
                subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--measure",
                        how,
                        str(checkpoint),
                        str(folder / how),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                    cwd=ROOT,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            rows.append({"shape": name, "params": params, "conversion": how, **json.loads(out)})
    print(
        f"{'shape':<6}{'params':>15}  {'conversion':<22}{'peak anon GiB':>14}{'peak RSS GiB':>13}"
        f"{'export GiB':>11}{'seconds':>9}"
    )
    labels = {"previous": "previous (fp32 + fp32)", "float32": "now, --dtype float32",
              "bfloat16": "now, --dtype bfloat16"}  # fmt: skip
    for r in rows:
        print(f"{r['shape']:<6}{r['params']:>15,}  {labels[r['conversion']]:<22}"
              f"{r['peak_anon_gib']:>14.2f}{r['peak_rss_gib']:>13.2f}{r['export_gib']:>11.2f}"
              f"{r['seconds']:>9.1f}")  # fmt: skip
    print(
        f"(each conversion in a fresh process; its imports alone: ~{rows[0]['anon_before_gib']:.2f} GiB)"
    )


if __name__ == "__main__":
    main()
