"""The released Fast-dLLM v2 checkpoint format (SPEC 4.2), read without remote code (issue 22):
a locally written folder in that format decodes token for token like the same weights saved
as a native export, every entry point takes it (folder or hub id), and a fine-tune starts
from it."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from lm_eval.api.instance import Instance
from transformers import Qwen2ForCausalLM

from src.config import ConfigError
from src.decoding import load_decoder
from src.model import MASK_TOKEN, build_model, load_tokenizer, read_settings
from tests.conftest import ROOT, run_train
from tests.fixtures.exports import DECODE
from tests.fixtures.released import make_released, publish_to_hub_cache

BLOCK = 8
HUB_ID = "fast-dllm-test/Fast_dLLM_v2_tiny"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    return make_released(tmp_path_factory.mktemp("released"), block_size=BLOCK)


def no_remote_code_imported() -> bool:
    return not any("Fast_dLLM" in name or "transformers_modules" in name for name in sys.modules)


def compose_with(config: str, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config, list(overrides))


def test_settings_come_from_bd_size_and_the_tokenizer(folders) -> None:
    released, native = folders
    settings, trained = read_settings(str(released)), read_settings(str(native))
    assert settings["block_size"] == trained["block_size"] == BLOCK
    for key in ("objective", "mask_token", "mask_token_id", "stop_token_id", "token_shift"):
        assert settings[key] == trained[key], key
    assert settings["imported"] == {
        "format": "fast_dllm_v2",
        "model_type": "Fast_dLLM_Qwen",
        "loaded_as": "qwen2",
    }


def test_released_checkpoint_decodes_like_its_native_export(folders) -> None:
    released, native = folders
    prompts = [[5, 9, 14, 20, 7], list(range(10, 31)), [40, 41]]
    for name in ("diffusion", "ar"):
        got = load_decoder(str(released), DECODE, decoder=name)
        expected = load_decoder(str(native), DECODE, decoder=name)
        assert type(got.export.model) is Qwen2ForCausalLM
        assert got.settings == expected.settings and got.settings.block_size == BLOCK
        assert got.generate(prompts).tokens == expected.generate(prompts).tokens, name
    assert no_remote_code_imported()


def test_every_entry_point_takes_it(folders) -> None:
    from src.evaluation.decode_bench import check_options
    from src.evaluation.lm_eval import FastDLLM
    from src.generate import check_config

    released, native = folders
    assert check_config(compose_with("generate", f"ckpt={released}", "prompt=hi")).block_size == 8
    bench = compose_with("bench_decode", f"ckpt={released}", f"ar_ckpt={native}")
    assert check_options(bench).block_size == BLOCK
    lm = FastDLLM(str(released), max_new_tokens=8, sub_block_size=4, device="cpu")
    assert lm.settings["imported"]["format"] == "fast_dllm_v2"
    request = Instance("generate_until", doc={}, arguments=("Sort: 3 1 2", {"until": []}), idx=0)
    assert isinstance(lm.generate_until([request])[0], str)
    assert no_remote_code_imported()


def test_src_eval_fetches_a_hub_id_through_the_hub_cache(folders, tmp_path, monkeypatch) -> None:
    """`ckpt=<hub id>` goes through huggingface_hub's snapshot download: offline, from a hub
    cache laid out as a download leaves it."""
    import huggingface_hub

    from src.evaluation.run import evaluate_export

    publish_to_hub_cache(folders[0], tmp_path / "hub", HUB_ID)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = compose_with(
        "eval",
        f"ckpt={HUB_ID}",
        "benchmark.n=3",
        "decode.max_new_tokens=8",
        "decode.sub_block_size=4",
        "batch_size=3",
    )
    metrics = evaluate_export(cfg, str(tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics
    assert metrics["ckpt"] == HUB_ID and metrics["num_scored"] == 3
    assert metrics["imported"]["format"] == "fast_dllm_v2"
    assert metrics["decode"]["block_size"] == BLOCK
    # model.pretrained=<hub id> reads the same way (the config through hf_hub_download).
    assert build_model(load_tokenizer(HUB_ID), pretrained=HUB_ID).config.model_type == "qwen2"
    with pytest.raises(ConfigError, match="no hub model of that id could be fetched"):
        read_settings("fast-dllm-test/no-such-model")  # offline, and not in any cache


def _without_mask_token(folder: Path) -> None:
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["content"] != MASK_TOKEN]
    del tokenizer["model"]["vocab"][MASK_TOKEN]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["extra_special_tokens"] = [t for t in config["extra_special_tokens"] if t != MASK_TOKEN]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("empty", "no diffusion.json"),
        ("not a causal LM", "no diffusion.json"),
        ("another bd_size model", "has bd_size but model_type 'Fast_dLLM_Llama'"),
        ("no mask token", "tokenizer lacks '|<MASK>|'"),
    ],
)
def test_neither_format_is_a_one_line_error(folders, tmp_path, change, message) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(folders[0], folder)
    config = json.loads((folder / "config.json").read_text())
    if change == "empty":
        shutil.rmtree(folder)
        folder.mkdir()
    elif change == "not a causal LM":
        (folder / "config.json").write_text(json.dumps({"model_type": "vit"}))
    elif change == "another bd_size model":
        (folder / "config.json").write_text(json.dumps(config | {"model_type": "Fast_dLLM_Llama"}))
    else:
        _without_mask_token(folder)
    with pytest.raises(ConfigError, match=message) as error:
        read_settings(str(folder))
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_fine_tune_starts_from_the_released_checkpoint(folders, tmp_path) -> None:
    released, _ = folders
    run_train(
        tmp_path,
        "experiment=tiny",
        f"model.pretrained={released}",
        f"diffusion.block_size={BLOCK}",
        f"paths.export_dir={tmp_path}/export",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
    )
    settings = read_settings(str(tmp_path / "export"))
    assert settings["init"] == str(released) and settings["trained_steps"] == 2
    assert settings["mask_token_id"] == read_settings(str(released))["mask_token_id"]
