"""Memory plan of a training run (`python -m src.plan`): parameters and per-GPU memory under
DDP, ZeRO-2, ZeRO-3 and ZeRO-3 with CPU offload, at the run's micro-batch and sequence length.

The model is built on the meta device from its config alone (no weights are read). Model
states (16-bit weights, gradients, fp32 master weights and Adam moments) come from DeepSpeed's
own estimators; activations are counted per token for the block-diffusion layout (two noisy
views and one shared clean stream: 3L tokens per sample), with gradient checkpointing as
configured. All sizes in GiB.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from src.config import ConfigError
from src.diffusion import ar_term_from_clean_stream
from src.model import build_tokenizer, check_model_source
from src.model.released import model_config as released_config
from src.training.checks import is_deepspeed

log = logging.getLogger(__name__)

GIB = 2**30
BF16 = 2
FP32 = 4
# Bytes per parameter of one training checkpoint (all ranks' shards together): DDP saves the
# fp32 weights and Adam's two fp32 moments; DeepSpeed the bf16 weights, fp32 master weights
# and the moments.
CHECKPOINT_BYTES = {"ddp": FP32 + 2 * FP32, "deepspeed": BF16 + FP32 + 2 * FP32}

# Used only when the hub cannot be reached (offline machines); copied from the models'
# config.json on the hub.
KNOWN_ARCHITECTURES = {
    "Qwen/Qwen2.5-1.5B-Instruct": {
        "model_type": "qwen2",
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    "Qwen/Qwen2.5-7B-Instruct": {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    },
}


@dataclass
class Row:
    """Per-GPU memory of one strategy, GiB, and the size of one of its checkpoints."""

    strategy: str
    states: float
    activations: float
    total: float
    fits: bool
    host_per_node: float
    checkpoint: float


@dataclass
class Plan:
    source: str
    params: int
    largest_layer: int
    gpus: int
    tokens_per_sample: int
    activations: float  # per GPU, GiB, strategy-independent
    rows: list[Row]
    export: float  # the HF export, GiB (bf16 weights)
    kept: int  # checkpoints a run keeps (callbacks.model_checkpoint.save_top_k)
    teacher: float  # per GPU, GiB: distillation's frozen AR teacher (SPEC 5.2), 0 without


def model_config(model: DictConfig) -> tuple[PretrainedConfig, str]:
    """The architecture of `model` and a line saying where it came from."""
    pretrained = model.get("pretrained")
    if pretrained is None:
        tokenizer = build_tokenizer(model)  # the scratch vocabulary is the tokenizer's
        config = AutoConfig.for_model(**{**model.config, "vocab_size": len(tokenizer)})
        return config, "scratch config (model.config)"
    kwargs = {"gguf_file": model.gguf_file} if model.get("gguf_file") else {}
    try:
        # A released Fast-dLLM v2 checkpoint: the stock config it loads as (no remote code).
        released = None if kwargs else released_config(pretrained)
        return released or AutoConfig.from_pretrained(pretrained, **kwargs), pretrained
    except OSError as err:
        if pretrained not in KNOWN_ARCHITECTURES:
            raise ValueError(
                f"cannot read the config of model.pretrained={pretrained} ({err}): "
                "pass a local folder holding its config.json"
            ) from None
        config = AutoConfig.for_model(**KNOWN_ARCHITECTURES[pretrained])
        return config, f"{pretrained} (hub unreachable: built-in copy of its architecture)"


def count_parameters(config: PretrainedConfig) -> tuple[int, int]:
    """(all parameters, the largest single module's own parameters), from a meta-device model."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def streams(diffusion: DictConfig) -> tuple[int, int]:
    """(sequences of length L run per sample, of which carry logits) for the objective."""
    if diffusion.objective == "ar":
        return 1, 1
    views = 2 if diffusion.complementary else 1
    # SPEC 6's one-cache variant takes the AR term from the clean stream's logits.
    clean = ar_term_from_clean_stream(diffusion)
    if diffusion.shared_clean_stream or views == 1:
        return views + 1, views + clean  # [x_t views ; x_0]
    return 2 * views, (2 if clean else 1) * views  # one [x_t ; x_0] per view


def activation_bytes(
    config: PretrainedConfig, tokens: int, logit_rows: int, checkpointing: bool
) -> int:
    """Activations kept for backward by one micro-batch (bf16), plus logits and the mask.

    Per token and layer a pre-norm decoder keeps about 6h + 2 kv + 4 I 16-bit values
    (norm outputs, q/k/v, attention output, MLP gate/up/act/product) and two fp32 norm inputs.
    With checkpointing only each layer's input stays, and one layer is recomputed at a time.
    """
    h, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_layer = tokens * (BF16 * (6 * h + 2 * kv + 4 * config.intermediate_size) + 2 * FP32 * h)
    layer_inputs = layers * tokens * h * BF16
    kept = layer_inputs + per_layer if checkpointing else layers * per_layer
    # bf16 logits, their fp32 copy in the loss, and its gradient (an upper bound: the loss
    # upcasts only the masked positions).
    logits = logit_rows * config.vocab_size * (BF16 + 2 * FP32)
    return kept + logits


def memory_plan(cfg: DictConfig) -> Plan:
    devices, nodes = cfg.trainer.devices, cfg.trainer.num_nodes
    if not isinstance(devices, int) or not isinstance(nodes, int):
        raise ConfigError(
            f"trainer.devices={devices} / trainer.num_nodes={nodes}: the plan needs numbers, "
            "e.g. trainer.devices=8 trainer.num_nodes=8"
        )
    # Imported here: DeepSpeed takes seconds to import and probes for accelerators.
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    config, source = model_config(cfg.model)
    params, largest = count_parameters(config)
    run_streams, logit_streams = streams(cfg.diffusion)
    seq_len, batch = cfg.data.seq_len, cfg.data.batch_size
    tokens = batch * run_streams * seq_len
    mask = (run_streams * seq_len) ** 2 * BF16  # one additive mask, broadcast over the batch
    activations = (
        activation_bytes(config, tokens, batch * logit_streams * seq_len, _checkpointing(cfg))
        + mask
    )
    if cfg.diffusion.get("ar_weight", 0.0) > 0 and not ar_term_from_clean_stream(cfg.diffusion):
        # The AR term's causal forward of x_0 keeps its activations until the backward.
        activations += activation_bytes(
            config, batch * seq_len, batch * seq_len, _checkpointing(cfg)
        )
    # Distillation's teacher: bf16 weights on every GPU (not partitioned, see check_distillation)
    # and its no-grad logits over the batch; its layer activations are freed as it goes.
    teacher = 0
    if cfg.diffusion.get("distill_weight", 0.0) > 0:
        teacher = params * BF16 + batch * seq_len * config.vocab_size * (BF16 + FP32)
    buffer = cfg.plan.cpu_buffer_factor
    estimates = {
        # bf16-mixed DDP: fp32 weights, gradients and Adam moments on every GPU, 16 B/param;
        # every process loads the fp32 model on the host first.
        "ddp": (params * FP32 * devices * buffer, params * 4 * FP32),
        "deepspeed_zero2": estimate_zero2_model_states_mem_needs(
            params, devices, nodes, cpu_offload=False, additional_buffer_factor=buffer
        ),
        "deepspeed_zero3": estimate_zero3_model_states_mem_needs(
            params, largest, devices, nodes, False, False, True, buffer
        ),
        "deepspeed_zero3_offload": estimate_zero3_model_states_mem_needs(
            params, largest, devices, nodes, True, True, True, buffer
        ),
    }
    rows = []
    for name, (host, states, *_) in estimates.items():
        total = (states + activations + teacher) / GIB + cfg.plan.overhead_gb
        fits = total <= cfg.plan.gpu_memory_gb
        checkpoint = params * CHECKPOINT_BYTES["ddp" if name == "ddp" else "deepspeed"] / GIB
        rows.append(Row(name, states / GIB, activations / GIB, total, fits, host / GIB, checkpoint))
    kept = cfg.callbacks.model_checkpoint.save_top_k
    return Plan(
        source,
        params,
        largest,
        devices * nodes,
        tokens // batch,
        activations / GIB,
        rows,
        export=params * BF16 / GIB,
        kept=kept,
        teacher=teacher / GIB,
    )


def _checkpointing(cfg: DictConfig) -> bool:
    return bool(cfg.model.get("gradient_checkpointing", False))


@dataclass
class LeadTime:
    """What a preemption signal must leave time for (`PreemptionCheckpoint`): reaching the end
    of the current optimizer step, then writing the run's checkpoint. Seconds, estimated."""

    checkpoint_gib: float
    write_s: float
    step_s: float

    @property
    def needed_s(self) -> float:
        return self.step_s + self.write_s


def step_flops(cfg: DictConfig, config: PretrainedConfig, params: int) -> float:
    """FLOPs one GPU spends on one optimizer step: every micro-batch's forward and backward
    (2 FLOPs per parameter and token per pass, backward = 2 passes, gradient checkpointing
    one more) plus attention (4 h S^2 per layer and pass over S tokens), for the run's
    objective: the noisy views and the clean stream, the AR term's causal pass, the teacher's
    forward."""
    h, layers = config.hidden_size, config.num_hidden_layers

    def forward(tokens: int) -> float:
        return 2 * params * tokens + 4 * layers * h * tokens**2

    trained = 4 if _checkpointing(cfg) else 3
    seq_len, (run_streams, _) = cfg.data.seq_len, streams(cfg.diffusion)
    flops = trained * forward(run_streams * seq_len)
    if cfg.diffusion.get("ar_weight", 0.0) > 0:
        flops += trained * forward(seq_len)
    if cfg.diffusion.get("distill_weight", 0.0) > 0:
        flops += forward(seq_len)
    return cfg.data.batch_size * cfg.trainer.accumulate_grad_batches * flops


def preemption_lead_time(cfg: DictConfig) -> LeadTime:
    """One optimizer step at `cluster.gpu_tflops` plus one checkpoint of the run's strategy
    at `cluster.write_gbps` (GB/s, all ranks together)."""
    config, _ = model_config(cfg.model)
    params, _ = count_parameters(config)
    kind = "deepspeed" if is_deepspeed(cfg.trainer.strategy) else "ddp"
    checkpoint = params * CHECKPOINT_BYTES[kind]
    return LeadTime(
        checkpoint_gib=checkpoint / GIB,
        write_s=checkpoint / (cfg.cluster.write_gbps * 1e9),
        step_s=step_flops(cfg, config, params) / (cfg.cluster.gpu_tflops * 1e12),
    )


def format_lead_time(lead: LeadTime, cfg: DictConfig) -> str:
    return (
        f"preemption:  ~{lead.step_s:.0f} s to finish an optimizer step (cluster.gpu_tflops="
        f"{cfg.cluster.gpu_tflops}) + ~{lead.write_s:.0f} s to write the {lead.checkpoint_gib:.1f} "
        f"GiB checkpoint (cluster.write_gbps={cfg.cluster.write_gbps}): the SLURM signal must "
        f"come >= {math.ceil(lead.needed_s)} s before the time limit (hydra.launcher.signal_delay_s)"
    )


def check_signal_delay(base: DictConfig, job: DictConfig) -> None:
    """A SLURM launcher's `signal_delay_s` (from the sweep's `base` config) must cover one
    job's preemption: ConfigError (one line) otherwise. A job check of `LaunchChecks`."""
    check_model_source(job.model)  # a missing AR-init: the command that makes it
    try:
        lead = preemption_lead_time(job)
    except ValueError as err:  # the model's architecture cannot be read
        raise ConfigError(f"cannot estimate the preemption lead time: {err}") from None
    delay = base.hydra.launcher.signal_delay_s
    if delay < lead.needed_s:
        raise ConfigError(
            f"hydra.launcher.signal_delay_s={delay} is too short for a preemption checkpoint: "
            f"finishing an optimizer step (~{lead.step_s:.0f} s at cluster.gpu_tflops="
            f"{job.cluster.gpu_tflops}) plus writing the {lead.checkpoint_gib:.1f} GiB checkpoint "
            f"(~{lead.write_s:.0f} s at cluster.write_gbps={job.cluster.write_gbps}) takes "
            f"~{lead.needed_s:.0f} s: raise it to >= {math.ceil(lead.needed_s)} "
            "(`python -m src.plan` prints the estimate)"
        )


def format_plan(plan: Plan, cfg: DictConfig) -> str:
    checkpointing = "on" if _checkpointing(cfg) else "off"
    seq_len = cfg.data.seq_len
    lines = [
        f"model:       {plan.source}",
        f"parameters:  {plan.params:,} ({plan.params / 1e9:.3f} B), "
        f"largest module {plan.largest_layer:,}",
        f"GPUs:        {plan.gpus} = {cfg.trainer.num_nodes} node(s) x {cfg.trainer.devices}",
        f"micro-batch: {cfg.data.batch_size} x {plan.tokens_per_sample} tokens "
        f"({plan.tokens_per_sample // seq_len}L, L = {seq_len}), gradient checkpointing "
        f"{checkpointing}, bf16 mixed precision",
        f"per-GPU memory, GiB (GPU: {cfg.plan.gpu_memory_gb}, overhead {cfg.plan.overhead_gb}):",
        f"{'strategy':<25}{'states':>9}{'activations':>13}{'total':>9}  fits  host RAM/node"
        f"  checkpoint  run disk",
    ]
    # A run keeps `kept` checkpoints and writes the next before it deletes the oldest; a
    # preemption checkpoint is deleted once a newer one exists. Plus the HF export.
    disk = [(plan.kept + 1) * row.checkpoint + plan.export for row in plan.rows]
    for row, run_disk in zip(plan.rows, disk, strict=True):
        lines.append(
            f"{row.strategy:<25}{row.states:>9.2f}{row.activations:>13.2f}{row.total:>9.2f}"
            f"  {'yes' if row.fits else 'NO ':<4}  {row.host_per_node:>12.1f}"
            f"  {row.checkpoint:>10.1f}  {run_disk:>8.1f}"
        )
    if plan.teacher:
        lines.append(
            f"distillation teacher (bf16 weights + logits), in each total: {plan.teacher:.2f}"
        )
    lines.append(
        f"disk (GiB): one checkpoint as above, {plan.kept} kept "
        f"(callbacks.model_checkpoint.save_top_k) + 1 being written + the export ({plan.export:.1f})"
    )
    return "\n".join(lines)
