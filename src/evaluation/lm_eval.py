"""lm-evaluation-harness model `fast_dllm`: an export decoded with cached parallel decoding.

Registered in lm-eval's model registry on import; `python -m src.lm_eval_adapter` is lm-eval's
command line with it. `generate_until` decodes through the export's `src.decoding.Decoder`
(`decoder=ar`: the AR baseline) as the released eval script does (SPEC 4.1): each continuation
ends at the stop token, not at the task's `until` strings (`stop_strings=true` cuts there too);
GSM8K's and MATH's trailing "Answer:" / "Solution:" cue becomes the step-by-step instruction
(tasks named `gsm8k*` / `minerva_math*`; `reasoning_cue=false` keeps the task's prompt); a
`max_new_tokens` model argument holds for every task (the released 2048), else each task's
`max_gen_toks`. `loglikelihood` scores continuations with the model's plain causal forward: with
the token shift, that is the AR view of the weights. Model arguments: `pretrained` (export dir),
any decode setting (defaults: conf/decode/default.yaml; `block_size` defaults to the trained
one), `decoder`, `device`, `dtype`, `batch_size`, `seed`, `stop_strings`, `reasoning_cue`. What
was used is in lm-eval's results file, under "config" (`get_model_info`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from tqdm.auto import tqdm

from src.config import ConfigError
from src.decoding import Decoder, DecodeSettings, check_export, load_decoder
from src.evaluation.benchmarks.reasoning import STEP_BY_STEP

DEFAULT_BATCH_SIZE = 8
# The released eval script's prompt rewrite: task-name prefix -> the cue it replaces.
REASONING_CUES = {"gsm8k": "Answer:", "minerva_math": "Solution:"}


# The model arguments of `FastDLLM` besides the decode settings. `trust_remote_code`: lm-eval
# adds it for its --trust_remote_code flag; no remote code runs here (src.model.released).
ADAPTER_KEYS = (
    "pretrained",
    "decoder",
    "device",
    "dtype",
    "batch_size",
    "max_batch_size",
    "seed",
    "stop_strings",
    "reasoning_cue",
    "trust_remote_code",
)


def check_model_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """The decode config of `--model_args` (conf/decode/default.yaml with the ones given),
    every key and value checked by the rules `src.eval` checks its config with
    (`check_export`): an unknown key or a bad value is one ConfigError line, before the
    model loads."""
    decode = DecodeSettings.defaults()
    if unknown := sorted(set(args) - set(ADAPTER_KEYS) - set(decode)):
        close = difflib.get_close_matches(unknown[0], [*ADAPTER_KEYS, *decode], n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(
            f"--model_args {unknown[0]}={args[unknown[0]]}: no such model argument; {hint}"
            f"fast_dllm takes {', '.join(ADAPTER_KEYS[:-1])} and the decode settings "
            f"({', '.join(decode)})"
        )
    if "pretrained" not in args:
        raise ConfigError("--model_args needs pretrained=<export dir>, e.g. artifacts/tiny")
    for key in ("stop_strings", "reasoning_cue"):
        if not isinstance(args.get(key, False), bool):
            raise ConfigError(f"--model_args {key}={args[key]!r} must be true or false")
    decode |= {k: v for k, v in args.items() if k in decode}
    check_export(args["pretrained"], decode, args.get("decoder", "diffusion"))
    return decode


class FastDLLM(TemplateLM):
    """An export (`pretrained`) evaluated through the block-diffusion decoder."""

    def __init__(
        self,
        pretrained: str,
        *,
        decoder: str = "diffusion",
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        max_batch_size: int | None = None,
        seed: int = 0,
        stop_strings: bool = False,
        reasoning_cue: bool = True,
        **options: Any,
    ) -> None:
        super().__init__()
        options.pop("trust_remote_code", None)  # see ADAPTER_KEYS
        decode = check_model_args(
            {
                "pretrained": pretrained,
                "decoder": decoder,
                "stop_strings": stop_strings,
                "reasoning_cue": reasoning_cue,
                **options,
            }
        )
        self.stop_strings, self.reasoning_cue = stop_strings, reasoning_cue
        # A budget given here holds for every task, as the released script's max_new_tokens.
        self.fixed_budget = "max_new_tokens" in options
        self.batch_size = _batch_size(batch_size)
        # lm-eval's --device defaults to cuda, also on machines without one.
        if not device or (device.startswith("cuda") and not torch.cuda.is_available()):
            device = "auto"
        self.decoder: Decoder = load_decoder(
            pretrained, decode, decoder=decoder, device=device, dtype=dtype, seed=seed
        )
        self.model, self.tokenizer = self.decoder.export.model, self.decoder.tokenizer
        self.settings, self.pretrained = self.decoder.export.settings, pretrained
        self._device = self.model.device

    @property
    def eot_token_id(self) -> int:
        return self.settings["stop_token_id"]

    @property
    def max_length(self) -> int:
        return self.model.config.max_position_embeddings

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        """Sum of log-probabilities of each continuation, and whether greedy decoding (argmax
        at every position) reproduces it, from the causal forward of context + continuation."""
        results = []
        batches = _chunks(requests, self.batch_size)
        for batch in tqdm(batches, desc="loglikelihood", disable=disable_tqdm):
            # The last max_length + 1 tokens: the final one is only ever a target.
            rows = [(ctx + cont)[-(self.max_length + 1) :] for _, ctx, cont in batch]
            width = max(len(r) for r in rows) - 1
            pad = self.eot_token_id
            ids = torch.tensor([r[:-1] + [pad] * (width - len(r) + 1) for r in rows])
            attention = torch.tensor(
                [[1] * (len(r) - 1) + [0] * (width - len(r) + 1) for r in rows]
            )
            with torch.no_grad():
                logits = self.model(
                    input_ids=ids.to(self.device), attention_mask=attention.to(self.device)
                ).logits  # [b, width, V]
            logprobs = F.log_softmax(logits.float(), dim=-1)
            for row, (request, _, cont), lp in zip(rows, batch, logprobs, strict=True):
                n = len(cont)
                targets = torch.tensor(row[-n:], device=lp.device)  # [n]
                lp = lp[len(row) - 1 - n : len(row) - 1]  # [n, V]: position i-1 scores token i
                answer = (
                    float(lp.gather(-1, targets[:, None]).sum()),
                    bool((lp.argmax(-1) == targets).all()),
                )
                self.cache_hook.add_partial("loglikelihood", request, answer)
                results.append(answer)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole strings, over disjoint windows of the model's context."""
        results = []
        for request in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            (string,) = request.args
            windows = map(
                utils.make_disjoint_window,
                utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            )
            pieces = [((None, None), ctx, cont) for ctx, cont in windows]
            total = sum(lp for lp, _ in self._loglikelihood_tokens(pieces, disable_tqdm=True))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            results.append(total)
        return results

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Decode each context; the continuation ends before the first `until` string."""
        results: list[str] = []
        batches = _chunks(requests, self.batch_size)
        for batch in tqdm(batches, desc="generate_until", disable=disable_tqdm):
            # Requests of one task share gen_kwargs; split where they differ.
            for group in _runs(batch, key=lambda r: self._request_options(r.args[1])):
                results += self._generate(group)
        return results

    def _generate(self, requests: Sequence[Any]) -> list[str]:
        decoder = self.decoder.replace(**self._request_options(requests[0].args[1]))
        prompts = [self.tok_encode(self._prompt(r.args[0], r.task_name)) for r in requests]
        # Leave room for the continuation: keep each prompt's most recent tokens.
        keep = self.max_length - decoder.settings.max_new_tokens
        result = decoder.generate([p[-keep:] for p in prompts])
        texts = self.tokenizer.batch_decode(result.tokens, skip_special_tokens=True)
        outputs = []
        for request, text in zip(requests, texts, strict=True):
            context, gen_kwargs = request.args
            if self.stop_strings:
                text = cut_at(text, gen_kwargs.get("until"))
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            outputs.append(text)
        return outputs

    def _prompt(self, context: str, task: str | None) -> str:
        """The context, its reasoning cue replaced for GSM8K and MATH tasks (as released)."""
        for prefix, cue in REASONING_CUES.items():
            if self.reasoning_cue and (task or "").startswith(prefix):
                return context.replace(cue, STEP_BY_STEP)
        return context

    def _request_options(self, gen_kwargs: dict) -> dict[str, Any]:
        """The decode settings one request changes: its token budget (unless `max_new_tokens`
        was given here) and, when it samples, temperature and top_p."""
        options: dict[str, Any] = {}
        for key in ("max_gen_toks", "max_new_tokens"):
            if gen_kwargs.get(key) is not None and not self.fixed_budget:
                options["max_new_tokens"] = int(gen_kwargs[key])
        if gen_kwargs.get("do_sample"):
            options["temperature"] = float(gen_kwargs.get("temperature", 1.0))
            options["top_p"] = float(gen_kwargs.get("top_p", 1.0))
        return options

    def get_model_info(self) -> dict[str, Any]:
        """What decoded: lm-eval puts it into its results file, under "config"."""
        return {
            "pretrained": self.pretrained,
            "decoder": self.decoder.name,
            "decode": self.decoder.settings.as_dict(),
            "max_new_tokens_from": "model_args" if self.fixed_budget else "task max_gen_toks",
            "stop_strings": self.stop_strings,
            "reasoning_cue": self.reasoning_cue,
        }


def cut_at(text: str, until: str | Sequence[str] | None) -> str:
    """`text` up to the earliest occurrence of any stop string."""
    stops = [until] if isinstance(until, str) else list(until or [])
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


def _batch_size(value: int | str | None) -> int:
    # lm-eval passes its --batch_size through as given ("8", "auto", "auto:4").
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size={size} must be >= 1")
    return size


def _chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _runs(items: Sequence, key: Any) -> Iterator[list]:
    """Consecutive items with equal `key`, in order."""
    run: list = []
    for item in items:
        if run and key(item) != key(run[0]):
            yield run
            run = []
        run.append(item)
    if run:
        yield run


# A lazy "module:class" entry, so lm-eval imports this module (not a copy) when it builds one.
if "fast_dllm" not in model_registry:
    model_registry.register("fast_dllm", target="src.evaluation.lm_eval:FastDLLM")
