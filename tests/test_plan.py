"""The memory plan (`python -m src.plan`): parameter counts from meta-device models and per-GPU
numbers that move the right way with GPU count, sequence length, layout and checkpointing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from transformers import AutoConfig, Qwen2Config

from src.training.plan import KNOWN_ARCHITECTURES, memory_plan

ROOT = Path(__file__).resolve().parents[1]
QWEN7B = "Qwen/Qwen2.5-7B-Instruct"


def compose_plan(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("plan", overrides=list(overrides))


@pytest.fixture(scope="module")
def qwen7b_folder(tmp_path_factory) -> Path:
    """A local folder with only Qwen2.5-7B's config.json (what an offline machine may have)."""
    path = tmp_path_factory.mktemp("qwen7b")
    AutoConfig.for_model(**KNOWN_ARCHITECTURES[QWEN7B]).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=400,
        tie_word_embeddings=True,
    ).save_pretrained(path)
    return path


def plan_rows(*overrides: str) -> tuple:
    plan = memory_plan(compose_plan(*overrides))
    return plan, {row.strategy: row for row in plan.rows}


def test_qwen7b_plan_is_consistent(qwen7b_folder):
    local = f"model.pretrained={qwen7b_folder}"
    plan64, rows64 = plan_rows("experiment=qwen7b", local)
    assert plan64.gpus == 64 and plan64.tokens_per_sample == 3 * 2048
    # Qwen2.5-7B has 7.62 B parameters (untied embeddings; the 545 M-row embedding is largest).
    assert 7.6e9 < plan64.params < 7.63e9
    assert plan64.largest_layer == 152064 * 3584
    _, rows8 = plan_rows("experiment=qwen7b", local, "trainer.num_nodes=1")
    # ZeRO-3 shards the model states over the GPUs; ZeRO-2 keeps a full 16-bit copy per GPU.
    assert rows8["deepspeed_zero3"].states > 4 * rows64["deepspeed_zero3"].states
    assert rows64["deepspeed_zero2"].states > 2 * plan64.params / 2**30
    z2, z3, off = (
        rows64[k] for k in ("deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload")
    )
    assert rows64["ddp"].states > z2.states > z3.states > off.states
    assert off.host_per_node > 0
    # The paper's setup fits an 80 GB GPU; a 16 GB one cannot hold ZeRO-2 of a 7B model.
    assert z3.fits and z3.total < 80
    _, small = plan_rows("experiment=qwen7b", local, "plan.gpu_memory_gb=16")
    assert not small["deepspeed_zero2"].fits


def test_activations_follow_layout_length_and_checkpointing(qwen7b_folder):
    base = ("experiment=qwen7b", f"model.pretrained={qwen7b_folder}")
    shared, _ = plan_rows(*base)
    separate, _ = plan_rows(*base, "diffusion.shared_clean_stream=false")
    assert separate.tokens_per_sample == 4 * 2048 and separate.activations > shared.activations
    ar, _ = plan_rows(*base, "diffusion=ar")
    assert ar.tokens_per_sample == 2048 and ar.activations < shared.activations
    longer, _ = plan_rows(*base, "data.seq_len=4096")
    assert longer.activations > 1.9 * shared.activations
    no_checkpointing, _ = plan_rows(*base, "model.gradient_checkpointing=false")
    assert no_checkpointing.activations > shared.activations + 10  # GiB
    # The AR term's causal forward of x_0 adds an L-token pass's activations (ar's).
    ar_term, _ = plan_rows(*base, "diffusion.ar_weight=0.5")
    assert ar_term.activations == pytest.approx(shared.activations + ar.activations, rel=0.02)


def test_distillation_teacher_is_counted(qwen7b_folder):
    base = ("experiment=qwen7b", f"model.pretrained={qwen7b_folder}", "strategy=deepspeed_zero2")
    plain, rows = plan_rows(*base)
    distil, distil_rows = plan_rows(*base, "diffusion.distill_weight=0.5")
    assert plain.teacher == 0 and distil.teacher > 2 * plain.params / 2**30  # bf16 weights
    for name, row in rows.items():
        assert distil_rows[name].total == pytest.approx(row.total + distil.teacher)


def test_tiny_plan(tiny_folder):
    plan, rows = plan_rows("experiment=tiny", f"model.pretrained={tiny_folder}")
    assert plan.gpus == 1
    embedding = 400 * 64
    # q (bias), k and v (bias, 2 kv heads of 16), o (no bias), gate/up/down, two norms
    layer = (64 * 64 + 64) + 2 * (64 * 32 + 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert plan.params == embedding + 2 * layer + 64  # tied head, final norm
    assert all(row.fits and row.total < 4 for row in rows.values())


def test_offline_hub_id_uses_the_builtin_architecture(qwen7b_folder):
    plan, _ = plan_rows("experiment=qwen7b")
    if "hub unreachable" not in plan.source:
        pytest.skip("the hub (or a cached config) is reachable here")
    local, _ = plan_rows("experiment=qwen7b", f"model.pretrained={qwen7b_folder}")
    assert plan.params == local.params


@pytest.mark.slow
def test_cli_prints_the_plan(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "src.plan",
            "experiment=qwen7b",
            "trainer.num_nodes=8",
            "trainer.devices=8",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(7.616 B)" in result.stdout
    for strategy in ("ddp", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload"):
        assert strategy in result.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "src.plan", "trainer.devices=auto", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert bad.returncode != 0 and "trainer.devices=8" in bad.stderr


def test_train_bench_times_the_recipe_with_its_extra_forwards(artifacts, tmp_path):
    """`src.bench train` adds the run's recipe beside AR, 4L and 3L: with the AR term, the
    memory saved for backward is the 3L step's plus the AR step's."""
    from src.config import compose as compose_entry
    from src.training.step_bench import bench_train

    cfg = compose_entry(
        "bench_train",
        [
            f"paths.artifacts_dir={artifacts}",
            f"paths.output_dir={tmp_path}",
            "diffusion.ar_weight=0.5",
            "diffusion.context=block_causal",  # the AR term's own forward (3L + L)
            "bench.steps=1",
        ],
    )
    rows = {row["objective"]: row for row in bench_train(cfg)}
    recipe = rows["shared stream + AR term (3L + L)"]
    shared, ar = rows["block diffusion, shared stream (3L)"], rows["ar"]
    extra = recipe["saved_for_backward_mib"] - shared["saved_for_backward_mib"]
    assert extra == pytest.approx(ar["saved_for_backward_mib"], rel=0.01)
