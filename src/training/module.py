"""The LightningModule: an AR-initialised HF causal LM trained with the block-diffusion loss.

The model is built in `configure_model`, so strategies that shard parameters at creation
(DeepSpeed ZeRO-3) see it being built, and a resumed run rebuilds it before loading weights.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from transformers import PreTrainedTokenizerBase

from src.diffusion import ar_loss, block_diffusion_loss
from src.model import MASK_TOKEN, model_from_config, stop_token_of, tokenizer_fingerprint
from src.training.zero import hf_deepspeed_config

# The `diffusion` keys of SPEC sections 5 and 6 that the loss takes as they are.
RECIPE_OPTIONS = (
    "masking",
    "masking_tilt",
    "masking_second_view",
    "distill_weight",
    "distill_temperature",
    "ar_weight",
    "context",
)


class DiffusionLM(L.LightningModule):
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        model: dict[str, Any],
        diffusion: dict[str, Any],
        optim: dict[str, Any],
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        # What the token ids mean: a resumed run must use the same tokenizer (`resume_path`).
        self.hparams["tokenizer_fingerprint"] = tokenizer_fingerprint(tokenizer)
        self.tokenizer = tokenizer
        self.model_cfg, self.diffusion, self.optim = dict(model), dict(diffusion), dict(optim)
        self.seed = seed
        self.mask_token_id = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
        self.model: torch.nn.Module | None = None
        # The frozen AR teacher of distillation (SPEC 5.2), kept out of the module's children:
        # no optimizer state, not in checkpoints; moved to the device in `on_fit_start`.
        self._teacher: list[torch.nn.Module] = []

    def configure_model(self) -> None:
        if self.model is not None:
            return
        # Under ZeRO-3 transformers must see the DeepSpeed config while loading, or it fills
        # empty parameter shards; it holds only a weak reference, so the module keeps it.
        strategy = self._trainer.strategy if self._trainer is not None else None
        self._hf_deepspeed_config = hf_deepspeed_config(strategy)
        # from_pretrained returns eval mode; Lightning keeps whatever mode it finds.
        self.model = model_from_config(self.tokenizer, self.model_cfg).train()
        if self.diffusion.get("distill_weight", 0.0) > 0:
            self._teacher = [self._build_teacher()]

    def _build_teacher(self) -> torch.nn.Module:
        """The AR-init the run starts from (or `diffusion.distill_teacher`), frozen, loaded
        once (`check_distillation` checked it exists and speaks the student's tokenizer)."""
        source = self.diffusion.get("distill_teacher") or self.model_cfg["pretrained"]
        config = {**self.model_cfg, "pretrained": source, "gradient_checkpointing": False}
        return model_from_config(self.tokenizer, config).eval().requires_grad_(False)

    def on_fit_start(self) -> None:
        # The training dtype: 16-bit under bf16/fp16 mixed precision, the model's otherwise.
        precision = str(self.trainer.precision)
        dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision.split("-")[0])
        for teacher in self._teacher:
            teacher.to(device=self.device, dtype=dtype or next(self.model.parameters()).dtype)

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        if self.diffusion["objective"] == "ar":
            return ar_loss(self.model, batch["input_ids"], batch["labels"])
        return block_diffusion_loss(
            self.model,
            batch["input_ids"],
            batch["labels"],
            mask_token_id=self.mask_token_id,
            block_size=self.diffusion["block_size"],
            eps=self.diffusion["eps"],
            complementary=self.diffusion["complementary"],
            token_shift=self.diffusion["token_shift"],
            shared_clean_stream=self.diffusion["shared_clean_stream"],
            teacher=self._teacher[0] if self._teacher else None,
            generator=generator,
            **{key: self.diffusion[key] for key in RECIPE_OPTIONS if key in self.diffusion},
        )

    def _generator(self, *keys: int) -> torch.Generator:
        # The noise of a step is a function of (seed, step, batch, rank), not of RNG history:
        # a resumed run draws exactly the masks the uninterrupted run drew.
        seed = hash((self.seed, self.global_rank, *keys)) % (2**63)
        return torch.Generator(device=self.device).manual_seed(seed)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # batch_idx is not stable across a mid-epoch restore (Lightning may renumber the
        # resumed epoch's batches), so the noise is keyed by the optimizer step and the
        # micro-batch within it.
        micro_batch = batch_idx % self.trainer.accumulate_grad_batches
        loss = self.loss(batch, self._generator(0, self.global_step, micro_batch))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # Fixed noise per validation batch, so validation losses compare across steps and runs.
        loss = self.loss(batch, self._generator(1, batch_idx))
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params,
            lr=self.optim["lr"],
            betas=tuple(self.optim["betas"]),
            weight_decay=self.optim["weight_decay"],
        )
        total = self.trainer.estimated_stepping_batches
        schedule = warmup_cosine(self.optim["warmup_steps"], total, self.optim["min_lr_ratio"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def export_settings(self) -> dict[str, Any]:
        """What `diffusion.json` records: decoding must match how the weights were trained."""
        stop_token, stop_token_id = stop_token_of(self.tokenizer)
        return {
            **self.diffusion,
            "mask_token": MASK_TOKEN,
            "mask_token_id": self.mask_token_id,
            "stop_token": stop_token,
            "stop_token_id": stop_token_id,
            "trained_steps": self.global_step,
            "init": self.model_cfg.get("pretrained") or "scratch",
        }


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float) -> Any:
    """LR multiplier: linear warmup, then cosine decay to `min_ratio`."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier
