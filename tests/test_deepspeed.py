"""DeepSpeed strategies: the exact config each strategy file gives DeepSpeed, and (slow) raw
`deepspeed.initialize` on 2 spawned gloo processes for what the Lightning runs of
tests/test_deepspeed_lightning.py do not cover: ZeRO-3 with CPU offload, bf16, an untied head,
gradient checkpointing, and how many parameters each rank holds.

The run loads a real tiny pretrained model through `DiffusionLM.configure_model` (ZeRO-3-aware),
trains a few steps with the block-diffusion loss, writes a sharded ZeRO checkpoint, and the
HF export made from that checkpoint must give the live engine's logits.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, Qwen2Config

from src.config import ConfigError
from src.data.tokenizer import train_tokenizer
from src.training.checks import check_strategy
from src.training.zero import deepspeed_config

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ["deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload"]
WORLD = 2
STEPS = 4
SEQ_LEN = 64
BLOCK = 16
TEXTS = ["the quick brown fox jumps over the lazy dog 0123456789"] * 20


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_config_is_what_lightning_gives_deepspeed(strategy):
    cfg = compose_train(f"strategy={strategy}", "trainer.accumulate_grad_batches=4")
    config = deepspeed_config(cfg)
    zero = config["zero_optimization"]
    assert zero["stage"] == (2 if strategy == "deepspeed_zero2" else 3)
    assert ("offload_param" in zero) == strategy.endswith("offload")
    assert config["bf16"] == {"enabled": True}  # from trainer.precision=bf16-mixed
    assert config["gradient_accumulation_steps"] == 4
    assert config["train_micro_batch_size_per_gpu"] == cfg.data.batch_size
    assert config["gradient_clipping"] == cfg.trainer.gradient_clip_val


def test_qwen7b_uses_zero3():
    cfg = compose_train("experiment=qwen7b")
    assert deepspeed_config(cfg)["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_deepspeed_runs_on_cpu_ranks_but_not_on_missing_gpus(strategy):
    check_strategy(compose_train(f"strategy={strategy}", "trainer.accelerator=cpu").trainer)
    if torch.cuda.is_available():
        pytest.skip("CUDA is there: the GPU case is not an error")
    cfg = compose_train(f"strategy={strategy}", "trainer=gpu")
    with pytest.raises(ConfigError, match="trainer.accelerator=gpu needs CUDA.*accelerator=cpu"):
        check_strategy(cfg.trainer)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> dict[bool, Path]:
    """Real tiny Qwen2s with a real (small) BPE tokenizer, saved like hub models, by whether
    the head is tied to the embeddings (Qwen2.5-1.5B ties it, 7B does not)."""
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    folders = {}
    for tied in (False, True):
        folders[tied] = tmp_path_factory.mktemp(f"pretrained_tied{tied}")
        config = Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            vocab_size=len(tokenizer),
            tie_word_embeddings=tied,
        )
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(folders[tied])
        tokenizer.save_pretrained(folders[tied])
    return folders


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _engine(rank: int, port: int, setup: dict) -> tuple:
    """One DeepSpeed rank: what Lightning's DeepSpeedStrategy does, minus its CUDA check.
    Returns (engine, module, tokenizer, the weights as loaded)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    import deepspeed
    import lightning as L
    from hydra.utils import instantiate

    from src.model import load_tokenizer
    from src.training.module import DiffusionLM
    from src.training.zero import gathered_parameters

    deepspeed.init_distributed("gloo")
    tokenizer = load_tokenizer(setup["pretrained"])
    strategy = instantiate(setup["strategy"])
    strategy.config = setup["ds_config"]
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, logger=False)
    module = DiffusionLM(tokenizer, setup["model"], setup["diffusion"], setup["optim"])
    module.trainer = trainer
    # Lightning calls configure_model inside the strategy's sharded context.
    with deepspeed.zero.Init(enabled=strategy.zero_stage_3, config_dict_or_path=strategy.config):
        module.configure_model()
    with gathered_parameters(module.model):
        loaded = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    optimizer = module.configure_optimizers()["optimizer"]
    engine, *_ = deepspeed.initialize(
        model=module, optimizer=optimizer, config=strategy.config, dist_init_required=False
    )
    return engine, module, tokenizer, loaded


def _worker(rank: int, port: int, setup: dict, out: str) -> None:
    from lightning.pytorch.strategies.strategy import _ForwardRedirection

    from src.model import save_export
    from src.training.zero import unpartitioned

    engine, module, tokenizer, loaded = _engine(rank, port, setup)
    generator = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, len(tokenizer) - 1, (1, SEQ_LEN), generator=generator)
    labels = ids.clone()
    labels[:, : SEQ_LEN // 4] = -100  # an unsupervised prompt
    batch = {"input_ids": ids, "labels": labels}
    losses = []
    for step in range(STEPS):
        noise = torch.Generator().manual_seed(step)
        loss = _ForwardRedirection()(engine, module, "loss", batch, noise)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    client = {"hyper_parameters": dict(module.hparams), "global_step": STEPS}
    engine.save_checkpoint(os.path.join(out, "zero"), client_state=client, tag="checkpoint")
    probe = torch.arange(SEQ_LEN)[None] % (len(tokenizer) - 1)
    with torch.no_grad():
        logits = module.model(probe).logits.float()
    # What HFExport does at the end of fit: gather on every rank, save on rank 0.
    with unpartitioned(module.model) as plain:
        if rank == 0:
            save_export(plain, tokenizer, module.export_settings(), f"{out}/live_export")
    if rank == 0:
        torch.save({"loaded": loaded, "logits": logits, "probe": probe}, f"{out}/rank0.pt")
        partitioned = [p.numel() for p in module.model.parameters()]
        with open(f"{out}/rank0.json", "w") as f:
            json.dump({"losses": losses, "local_numel": sum(partitioned)}, f)
    _shut_down()


def _shut_down() -> None:
    """Leave together and close the process group: a rank exiting with gloo's threads still
    running can abort ("terminate called without an active exception")."""
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def run_deepspeed(strategy: str, pretrained: Path, out: Path, *overrides: str) -> dict:
    cfg = compose_train(
        f"strategy={strategy}",
        "model=hf",
        f"model.pretrained={pretrained}",
        f"diffusion.block_size={BLOCK}",
        f"data.seq_len={SEQ_LEN}",
        "data.batch_size=1",
        "optim.lr=1e-2",
        "optim.warmup_steps=0",
        *overrides,
    )
    setup = {
        "pretrained": str(pretrained),
        "strategy": OmegaConf.to_container(cfg.trainer.strategy),
        "ds_config": deepspeed_config(cfg),
        **{k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "diffusion")},
        "optim": OmegaConf.to_container(cfg.optim, resolve=True),
    }
    torch.multiprocessing.start_processes(
        _worker, args=(free_port(), setup, str(out)), nprocs=WORLD, start_method="spawn"
    )
    with open(out / "rank0.json") as f:
        return {**json.load(f), **torch.load(out / "rank0.pt")}


@pytest.mark.slow
def test_zero3_offload_training_checkpoint_and_export(pretrained, tmp_path):
    from src.model import load_export
    from src.training.zero_export import export_lightning_zero_checkpoint

    # Tiny tensors stay unpartitioned under the default persistence threshold: partition all.
    overrides = [
        "model.gradient_checkpointing=true",
        "trainer.strategy.config.zero_optimization.stage3_param_persistence_threshold=0",
    ]
    pretrained = pretrained[False]  # an untied head, as Qwen2.5-7B's
    result = run_deepspeed("deepspeed_zero3_offload", pretrained, tmp_path, *overrides)

    # ZeRO-3-aware loading: the sharded model holds exactly the pretrained weights (in bf16:
    # zero.Init casts at creation).
    reference = AutoModelForCausalLM.from_pretrained(pretrained)
    total = sum(p.numel() for p in reference.parameters())
    for name, value in reference.state_dict().items():
        loaded = result["loaded"][name]
        torch.testing.assert_close(loaded, value.to(loaded.dtype), rtol=0, atol=0)
    assert result["local_numel"] <= total / WORLD + WORLD  # each rank holds ~half
    assert result["losses"][-1] < result["losses"][0]

    # ZeRO checkpoint -> consolidated fp32 -> HF export; in bf16 it is the engine's model.
    export_lightning_zero_checkpoint(str(tmp_path / "zero"), str(tmp_path / "export"))
    export = load_export(str(tmp_path / "export"), dtype=torch.bfloat16)
    assert export.settings["trained_steps"] == STEPS
    assert export.settings["block_size"] == BLOCK
    with torch.no_grad():
        logits = export.model(result["probe"]).logits.float()
        initial = reference.to(torch.bfloat16)(result["probe"]).logits.float()
    torch.testing.assert_close(logits, result["logits"], rtol=0, atol=1e-2)
    assert (initial - result["logits"]).abs().max() > 0.1  # training moved the weights
    live = load_export(str(tmp_path / "live_export"), dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(live.model(result["probe"]).logits.float(), logits)
