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
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from src.config import DECODERS, GENERATE_KEYS, ConfigError, resolve_decode
from src.decoding import GenerationResult, generate, generate_ar
from src.export import Export, load_export, read_settings


def check_config(cfg: DictConfig) -> dict[str, Any]:
    """Every check that needs no model; returns the resolved decode config."""
    if cfg.decoder not in DECODERS:
        raise ConfigError(f"decoder={cfg.decoder!r}: choose one of {', '.join(DECODERS)}")
    if cfg.chat == (cfg.prompt is not None):
        raise ConfigError('pass exactly one of prompt="..." and chat=true')
    if cfg.prompt is not None and not str(cfg.prompt).strip():
        raise ConfigError('prompt is empty: pass prompt="<your question>"')
    settings = read_settings(cfg.ckpt)
    if cfg.decoder == "diffusion" and settings.get("mask_token_id") is None:
        raise ConfigError(f"{cfg.ckpt} has no mask token, so it cannot diffuse: use decoder=ar")
    return resolve_decode(cfg.decode, settings["block_size"])


class Chat:
    """A conversation with an export; `reply` decodes the assistant's next turn."""

    def __init__(
        self,
        export: Export,
        decode: dict[str, Any],
        *,
        decoder: str,
        system: str | None = None,
        seed: int = 0,
    ) -> None:
        self.export, self.decode, self.decoder = export, decode, decoder
        self.messages: list[dict[str, str]] = []
        if system:
            self.messages.append({"role": "system", "content": system})
        self.generator = torch.Generator(export.model.device).manual_seed(seed)

    def reply(self, user: str) -> tuple[str, GenerationResult]:
        """The assistant's answer to `user` (kept in the conversation) and its decode stats."""
        self.messages.append({"role": "user", "content": user})
        tokenizer, settings = self.export.tokenizer, self.export.settings
        text = tokenizer.apply_chat_template(
            self.messages, tokenize=False, add_generation_prompt=True
        )
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"]]
        if self.decoder == "ar":
            result = generate_ar(
                self.export.model,
                ids,
                stop_token_id=settings["stop_token_id"],
                max_new_tokens=self.decode["max_new_tokens"],
            )
        else:
            result = generate(
                self.export.model,
                ids,
                mask_token_id=settings["mask_token_id"],
                stop_token_id=settings["stop_token_id"],
                generator=self.generator,
                **{k: self.decode[k] for k in GENERATE_KEYS},
            )
        answer = tokenizer.decode(result.tokens[0], skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": answer})
        return answer, result


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
        decode = check_config(cfg)
    except ValueError as err:  # ConfigError included: one line, before loading the model
        raise SystemExit(f"error: {err}") from None
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    export = load_export(
        cfg.ckpt, device=cfg.device, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation
    )
    chat = Chat(export, decode, decoder=cfg.decoder, system=cfg.system, seed=cfg.seed)
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
