"""Decode with an export from the command line: one prompt, or a chat read from stdin.

    python -m src.generate ckpt=artifacts/tiny prompt="Sort: 3 1 2"
    python -m src.generate ckpt=artifacts/tiny prompt="..." decode.threshold=0.7 \
        decode.sub_block_size=4 decode.use_sub_block_cache=true
    python -m src.generate ckpt=artifacts/tiny prompt="..." decoder=ar     # the AR baseline
    printf 'Sort: 3 1 2\\nReverse: a b c\\n' | python -m src.generate ckpt=artifacts/tiny chat=true

Prompts are rendered with the export's chat template. The answer goes to stdout, followed by
one stats line (tokens, forwards, tokens/forward, tokens/s). `chat=true` treats each stdin line
as a user turn of one growing conversation. `decode.block_size` defaults to the export's
trained block size; another value is an error unless `decode.allow_block_size_mismatch=true`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from src.config import ConfigError
from src.decoding import (
    Chat,
    DecodeSettings,
    GenerationResult,
    check_export,
    load_decoder_from_config,
)


def check_config(cfg: DictConfig) -> DecodeSettings:
    """Every check that needs no model; returns the resolved decode settings."""
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise ConfigError("pass ckpt=<export dir>, e.g. ckpt=artifacts/tiny")
    if cfg.chat == (cfg.prompt is not None):
        raise ConfigError('pass exactly one of prompt="..." and chat=true')
    if cfg.prompt is not None and not str(cfg.prompt).strip():
        raise ConfigError('prompt is empty: pass prompt="<your question>"')
    return check_export(cfg.ckpt, cfg.decode, cfg.decoder)[1]


def stats_line(result: GenerationResult) -> str:
    return (
        f"[{result.num_tokens} tokens | {result.forwards} forwards | "
        f"{result.tokens_per_forward:.2f} tokens/forward | {result.tokens_per_second:.1f} tokens/s]"
    )


def user_turns(lines: Iterable[str]) -> Iterable[str]:
    """Non-blank stdin lines, stripped."""
    return (line.strip() for line in lines if line.strip())


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    try:
        check_config(cfg)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        # A load fault (truncated weights, a bad config.json) is the same line as in src.eval.
        decoder = load_decoder_from_config(cfg)
    except ValueError as err:  # ConfigError included: one line, before any decoding
        raise SystemExit(f"error: {err}") from None
    chat = Chat(decoder, system=cfg.system)
    turns = user_turns(sys.stdin) if cfg.chat else [cfg.prompt]
    for user in turns:
        try:
            answer, result = chat.reply(user)
        except ValueError as err:  # e.g. the conversation outgrew the model's context
            raise SystemExit(f"error: {err}") from None
        print(answer, flush=True)
        print(stats_line(result), flush=True)


if __name__ == "__main__":
    main()
