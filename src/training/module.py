"""The LightningModule: an AR-initialised HF causal LM trained with the block-diffusion loss.

The model is built in `configure_model`, so strategies that shard parameters at creation
(DeepSpeed ZeRO-3) see it being built, and a resumed run rebuilds it before loading weights.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
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
        self._step_loss: torch.Tensor | float = 0.0  # this rank's micro-batch losses of the step

    def configure_model(self) -> None:
        if self.model is not None:
            return
        # Under ZeRO-3 transformers must see the DeepSpeed config while loading, or it fills
        # empty parameter shards; it holds only a weak reference, so the module keeps it.
        strategy = self._trainer.strategy if self._trainer is not None else None
        self._hf_deepspeed_config = hf_deepspeed_config(strategy)
        config = dict(self.model_cfg)
        if config.get("dtype", "auto") == "auto":
            config["dtype"] = _name(parameter_dtype(self._trainer))
        # from_pretrained returns eval mode; Lightning keeps whatever mode it finds.
        self.model = model_from_config(self.tokenizer, config).train()
        if self.diffusion.get("distill_weight", 0.0) > 0:
            self._teacher = [self._build_teacher(config)]

    def _build_teacher(self, student: dict[str, Any]) -> torch.nn.Module:
        """The AR-init the run starts from (or `diffusion.distill_teacher`), frozen, loaded
        once (`check_distillation` checked it exists and speaks the student's tokenizer),
        straight in the dtype it computes in."""
        source = self.diffusion.get("distill_teacher") or self.model_cfg["pretrained"]
        dtype = compute_dtype(self._trainer) or getattr(torch, student["dtype"])
        config = {
            **student,
            "pretrained": source,
            "gradient_checkpointing": False,
            "dtype": _name(dtype),
        }
        return model_from_config(self.tokenizer, config).eval().requires_grad_(False)

    def on_fit_start(self) -> None:
        for teacher in self._teacher:
            teacher.to(device=self.device)

    def loss(
        self,
        batch: dict[str, torch.Tensor],
        generator: torch.Generator,
        normaliser: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.diffusion["objective"] == "ar":
            return ar_loss(self.model, batch["input_ids"], batch["labels"], normaliser)
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
            normaliser=normaliser,
            **{key: self.diffusion[key] for key in RECIPE_OPTIONS if key in self.diffusion},
        )

    def _generator(self, *keys: int) -> torch.Generator:
        # The noise of a step is a function of (seed, step, batch, rank), not of RNG history:
        # a resumed run draws exactly the masks the uninterrupted run drew.
        seed = hash((self.seed, self.global_rank, *keys)) % (2**63)
        return torch.Generator(device=self.device).manual_seed(seed)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # The noise is keyed by the optimizer step and the micro-batch within it (checkpoints
        # are taken at step boundaries, and an epoch holds whole steps).
        accumulate = self.trainer.accumulate_grad_batches
        micro_batch = batch_idx % accumulate
        generator = self._generator(0, self.global_step, micro_batch)
        if "window_supervised" in batch:
            # SPEC section 2: over the supervised tokens of the whole step (every rank, every
            # micro-batch; the data knows them before the step starts). DDP and DeepSpeed
            # alike average the micro-batches' gradients over ranks and the accumulation, so
            # each micro-batch's loss is its sum over the step's count, times those shares:
            # the step's gradient is then that of one batch holding all of it.
            shares = self.trainer.world_size * accumulate
            loss = self.loss(batch, generator, batch["window_supervised"][0]) * shares
        else:  # batches from elsewhere (no datamodule): each normalised by its own count
            loss = self.loss(batch, generator)
        # Logged once per step: the step's loss (the mean of its micro-batches over ranks).
        self._step_loss = self._step_loss + loss.detach()
        if micro_batch == accumulate - 1:
            self.log("train/loss", self._step_loss / accumulate, prog_bar=True, sync_dist=True)
            self._step_loss = 0.0
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


def compute_dtype(trainer: L.Trainer | None) -> torch.dtype | None:
    """The 16-bit dtype of bf16 / fp16 precision (mixed or true), None for 32-bit."""
    precision = str(trainer.precision) if trainer is not None else "32-true"
    return {"bf16": torch.bfloat16, "16": torch.float16}.get(precision.split("-")[0])


def parameter_dtype(trainer: L.Trainer | None) -> torch.dtype:
    """The dtype a run builds its model in (`model.dtype: auto`): the one its strategy trains
    the parameters in, so nothing is built in fp32 only to be cast.

    DeepSpeed with bf16 / fp16 keeps 16-bit parameters (it casts the module itself, ZeRO-3 at
    creation) and makes its fp32 master weights from those 16-bit values: a model built in
    fp32 gives the same master weights and costs twice the memory while it is built (a 7B
    student: ~30 GB instead of ~15 GB per rank, before DeepSpeed casts it). `*-true`
    precision: its dtype. Lightning's own mixed precision (DDP, single device) autocasts
    fp32 parameters, which its optimizer updates: float32.
    """
    dtype = compute_dtype(trainer)
    if dtype is None:
        return torch.float32
    if str(trainer.precision).endswith("-true") or isinstance(trainer.strategy, DeepSpeedStrategy):
        return dtype
    return torch.float32


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float) -> Any:
    """LR multiplier: linear warmup, then cosine decay to `min_ratio`."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier
