"""Every config in conf/ composes; bad configs fail at compose time with a one-line error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from src.config import ConfigError
from src.data.sft import check_lengths
from src.decoding import DecodeSettings
from src.diffusion import check_diffusion
from src.model import check_model_source
from tests.fixtures.exports import make_export

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# The groups `train.yaml` selects from (other entry points have their own config tests).
GROUPS = sorted(
    next(iter(d)) for d in OmegaConf.load(CONF / "train.yaml").defaults if isinstance(d, dict)
)
GROUPS = [g for g in GROUPS if g not in ("hydra", "experiment")]


def options(group: str, nested: bool = False) -> list[str]:
    """The options of a config group; `nested`: also those in subfolders (`tiny_repro/bd`)."""
    paths = (CONF / group).rglob("*.yaml") if nested else (CONF / group).glob("*.yaml")
    return sorted(str(p.relative_to(CONF / group).with_suffix("")) for p in paths)


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize(
    "override",
    [f"{g}={o}" for g in GROUPS for o in options(g)]
    + [f"experiment={o}" for o in options("experiment", nested=True)],
)
def test_every_config_composes(override):
    cfg = compose_train(override)
    assert OmegaConf.to_yaml(cfg)


def run_train(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "src.train", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


# Every top-level experiment, and a study's run (they all compose in-process above).
@pytest.mark.parametrize("experiment", [*options("experiment"), "tiny_repro/bd_wide"])
def test_cfg_job_shows_the_resolved_config(experiment):
    result = run_train(f"experiment={experiment}", "--cfg", "job", "--resolve")
    assert result.returncode == 0, result.stderr
    cfg = OmegaConf.create(result.stdout)
    assert cfg.decode.block_size == cfg.diffusion.block_size
    assert cfg.data.seq_len % cfg.diffusion.block_size == 0


@pytest.mark.parametrize("experiment", ["qwen1_5b", "qwen7b"])
def test_paper_experiments_carry_the_paper_hyperparameters(experiment):
    cfg = compose_train(f"experiment={experiment}")
    lr = {"qwen1_5b": 2e-5, "qwen7b": 1e-5}[experiment]
    steps = {"qwen1_5b": 6000, "qwen7b": 2500}[experiment]
    global_batch = (
        cfg.data.batch_size
        * cfg.trainer.devices
        * cfg.trainer.num_nodes
        * cfg.trainer.accumulate_grad_batches
    )
    assert (cfg.optim.lr, cfg.trainer.max_steps, cfg.optim.warmup_steps) == (lr, steps, 500)
    assert (global_batch, cfg.data.seq_len, cfg.diffusion.block_size) == (256, 2048, 32)
    assert cfg.trainer.precision == "bf16-mixed"


def diffusion(**kw):
    base = dict(objective="block_diffusion", block_size=32)
    return OmegaConf.create({**base, **kw})


def decode(**kw):
    base = dict(block_size=32, sub_block_size=8, threshold=0.9, max_new_tokens=128)
    base |= dict(use_sub_block_cache=False, temperature=0.0, top_p=1.0)
    return DecodeSettings.resolve(OmegaConf.create({**base, **kw}), 32)


@pytest.mark.parametrize(
    "check,match",
    [
        (
            lambda: check_lengths(100, diffusion().block_size),
            "data.seq_len=100 is not a multiple",
        ),
        (
            lambda: check_lengths(128, diffusion(block_size=0).block_size),
            "diffusion.block_size=0 must be >= 1",
        ),
        (lambda: check_diffusion(diffusion(objective="mdlm")), "choose block_diffusion or ar"),
        (lambda: decode(sub_block_size=5), "decode.sub_block_size=5 must divide"),
        (
            lambda: decode(threshold=1.5),
            r"decode.threshold=1.5 must be in \[0, 1\]",
        ),
        (lambda: decode(threshold=-0.1), "decode.threshold=-0.1"),
    ],
)
def test_bad_values_raise_one_line_errors(check, match):
    with pytest.raises(ConfigError, match=match) as err:
        check()
    assert "\n" not in str(err.value)


def test_missing_model_path_names_the_experiment_that_makes_it(tmp_path):
    model = OmegaConf.create(
        {
            "pretrained": str(tmp_path / "nope"),
            "produced_by": "python -m src.train experiment=tiny_ar",
        }
    )
    with pytest.raises(ConfigError, match="experiment=tiny_ar"):
        check_model_source(model)


def test_bad_config_fails_before_any_model_is_loaded(tmp_path):
    result = run_train(f"paths.artifacts_dir={tmp_path}", "data.seq_len=100")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "data.seq_len=100 is not a multiple of diffusion.block_size=32" in last
    result = run_train(f"paths.artifacts_dir={tmp_path}")  # tiny needs tiny_ar's export
    assert result.returncode != 0
    assert "python -m src.train experiment=tiny_ar" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["diffusion.masking_tilt=1.5"], r"diffusion.masking_tilt=1.5 must be in \[0, 1\]"),
        (["diffusion.masking=cosine"], "diffusion.masking='cosine'"),
        (["diffusion.masking_second_view=mirror"], "diffusion.masking_second_view='mirror'"),
        (["diffusion.distill_weight=-1"], "diffusion.distill_weight=-1 must be >= 0"),
        (["diffusion.distill_temperature=0"], "diffusion.distill_temperature=0 must be > 0"),
        (["diffusion.ar_weight=-0.5"], "diffusion.ar_weight=-0.5 must be >= 0"),
        (["diffusion.context=bidirectional"], "diffusion.context='bidirectional': choose"),
        (["diffusion=ar", "diffusion.ar_weight=0.5"], "set diffusion.objective=block_diffusion"),
        (
            ["diffusion=ar", "diffusion.distill_weight=0.5"],
            "set diffusion.objective=block_diffusion",
        ),
    ],
)
def test_bad_recipe_options_are_one_line_errors(overrides, match):
    with pytest.raises(ConfigError, match=match) as err:
        check_diffusion(compose_train(*overrides).diffusion)
    assert "\n" not in str(err.value)


def test_distillation_needs_a_teacher_of_the_same_tokenizer(artifacts, tmp_path):
    from src.training.checks import check_distillation

    from_scratch = compose_train(
        "experiment=tiny_ar", "diffusion=block_diffusion", "diffusion.distill_weight=1"
    )
    with pytest.raises(ConfigError, match="needs an AR teacher"):
        check_distillation(from_scratch)
    zero3 = compose_train(
        f"paths.artifacts_dir={artifacts}", "diffusion.distill_weight=1", "strategy=deepspeed_zero3"
    )
    with pytest.raises(ConfigError, match="not supported yet.*deepspeed_zero2"):
        check_distillation(zero3)
    other = make_export(tmp_path / "other", vocab_size=320)
    foreign = compose_train(
        f"paths.artifacts_dir={artifacts}",
        "diffusion.distill_weight=1",
        f"diffusion.distill_teacher={other}",
    )
    with pytest.raises(ConfigError, match="another tokenizer than the student"):
        check_distillation(foreign)
    check_distillation(
        compose_train(f"paths.artifacts_dir={artifacts}", "diffusion.distill_weight=1")
    )


def test_decode_eval_refuses_a_run_it_cannot_decode():
    from src.training.checks import check_decode_eval

    unshifted = ["callbacks=decode_eval", "diffusion.token_shift=false"]
    with pytest.raises(ConfigError, match="token_shift=false cannot be decoded") as err:
        check_decode_eval(compose_train(*unshifted))
    assert "\n" not in str(err.value)
    check_decode_eval(compose_train(*unshifted, "callbacks.decode_eval.decoder=ar"))
    check_decode_eval(compose_train("callbacks=decode_eval"))
    check_decode_eval(compose_train("diffusion.token_shift=false"))
