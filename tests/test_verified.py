"""Self-verified decoding (SPEC section 6) against a plain greedy causal loop and the AR
baseline, on real tiny models: random ones and trained exports."""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src.config import ConfigError
from src.decoding import (
    DecodeSettings,
    generate,
    generate_ar,
    generate_verified,
    load_decoder,
    make_decoder,
)
from src.decoding.settings import DRAFTS
from src.diffusion.settings import CONTEXTS
from src.evaluation.benchmarks import get
from src.evaluation.runner import evaluate, render_prompts
from src.model import load_export, read_settings
from tests.conftest import ROOT, SMALL, run_train
from tests.test_decoding import MASK_ID, NO_STOP, VOCAB, make_model, prompt

BLOCK, MAX_NEW = 8, 21  # budgets end mid-block for most prompt lengths
LENGTHS = (1, 7, 8, 9, 17)  # around block boundaries
# How strongly one token is favoured: 0, a random model (drafts rarely agree with the causal
# mode: short acceptances); 30, some agreement; 1000, one token everywhere (whole blocks
# accepted, every draft agreeing).
BOOSTS = (0.0, 30.0, 1000.0)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def boosted(arch: str, boost: float) -> torch.nn.Module:
    """A float64 test model whose logit of token 5 is raised by `boost`."""
    model = make_model(arch)
    if boost:
        bias = torch.zeros(VOCAB, dtype=model.dtype)
        bias[5] = boost
        model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    return model


@torch.no_grad()
def greedy_reference(model, ids: list[int], *, max_new: int, stop: int) -> list[int]:
    """The causal mode's greedy decoding written plainly: per token, a cache-free causal
    forward of the whole sequence and the argmax of its last logit; ends at `stop`."""
    tokens, out = list(ids), []
    for _ in range(max_new):
        token = int(model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax())
        tokens.append(token)
        out.append(token)
        if token == stop:
            break
    return out


def verified(model, prompts, *, stop=NO_STOP, max_new=MAX_NEW, **kw):
    kw = {"sub_block_size": 4, "threshold": 0.9, **kw}
    return generate_verified(
        model, prompts, mask_token_id=MASK_ID, stop_token_id=stop, block_size=BLOCK,
        max_new_tokens=max_new, **kw,
    )  # fmt: skip


def test_verified_is_the_causal_greedy_output(arch):
    prompts = [prompt(n) for n in LENGTHS]
    accepted = collections.defaultdict(list)
    for boost in BOOSTS:
        model = boosted(arch, boost)
        want = [greedy_reference(model, p, max_new=MAX_NEW, stop=NO_STOP) for p in prompts]
        ar = generate_ar(model, prompts, stop_token_id=NO_STOP, max_new_tokens=MAX_NEW)
        assert ar.tokens == want  # the AR baseline is the same greedy decoding
        for context, draft in itertools.product(CONTEXTS, DRAFTS):
            batch = verified(model, prompts, draft=draft, context=context)
            assert batch.tokens == want, (boost, context, draft)
            # Every generated token was made final by one verification.
            assert [sum(a) for a in batch.accepted_per_iteration] == [MAX_NEW] * len(prompts)
            accepted[boost] += [n for row in batch.accepted_per_iteration for n in row]
            if boost == BOOSTS[1]:  # alone, each prompt gets what it gets in the batch
                alone = [verified(model, [p], draft=draft, context=context) for p in prompts]
                assert [r.tokens[0] for r in alone] == want, (context, draft)
    # The cases were exercised: drafts rejected at once, and whole blocks of them accepted.
    assert accepted[0.0].count(1) > 0 and max(accepted[1000.0]) > BLOCK


@pytest.mark.parametrize("context", CONTEXTS)
def test_stop_tokens_inside_drafts(arch, context):
    model = boosted(arch, 30.0)
    prompts = [prompt(n) for n in LENGTHS]
    free = [greedy_reference(model, p, max_new=MAX_NEW, stop=NO_STOP) for p in prompts]
    stop = collections.Counter(t for row in free for t in row[3:] if t != 5).most_common(1)[0][0]
    want = [greedy_reference(model, p, max_new=MAX_NEW, stop=stop) for p in prompts]
    assert len({len(w) for w in want}) > 1  # rows stop at different places, some not at all
    for draft in DRAFTS:
        batch = verified(model, prompts, stop=stop, draft=draft, context=context)
        assert batch.tokens == want
        assert [verified(model, [p], stop=stop, draft=draft, context=context).tokens[0]
                for p in prompts] == want  # fmt: skip


def test_forwards_are_counted_by_kind():
    model = boosted("qwen2", 30.0)
    prompts = [prompt(n) for n in LENGTHS]
    for context, draft in itertools.product(CONTEXTS, DRAFTS):
        result = verified(model, prompts, draft=draft, context=context)
        kinds = result.forwards_by_kind
        assert sum(kinds.values()) == result.forwards
        if context == "causal":  # one cache: every forward verifies and drafts
            assert set(kinds) == {"verify+draft"}
        else:  # the prefill and the block commits ride on draft forwards
            assert set(kinds) <= {"draft", "commit", "verify"} and kinds["commit"] >= 1
            alone = verified(model, [prompts[3]], draft=draft, context=context)
            assert alone.forwards_by_kind["verify"] == alone.iterations
        assert result.tokens_per_forward == result.num_tokens / result.forwards
        assert result.acceptance_length >= 1
    single = verified(model, [prompts[0]], draft="single")
    assert (
        single.forwards_by_kind.get("draft", 0) + single.forwards_by_kind["commit"]
        == (single.forwards_by_kind["verify"])
    )  # one draft forward per verification


def test_verified_refuses_what_it_cannot_do():
    model = make_model()
    with pytest.raises(ConfigError, match="decode.draft='loop'"):
        verified(model, [prompt(3)], draft="loop")
    with pytest.raises(ConfigError, match="diffusion.context='bidirectional'"):
        verified(model, [prompt(3)], context="bidirectional")
    with pytest.raises(ValueError, match="non-empty"):
        verified(model, [[]])


@contextlib.contextmanager
def host_syncs() -> collections.Counter:
    """Count the calls that copy a tensor's values to the host (on a GPU: wait for it)."""
    counts: collections.Counter = collections.Counter()
    names = ("item", "tolist", "__bool__", "__int__", "__index__", "__float__", "cpu", "numpy")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def counting(name, method):
        def call(self, *args, **kwargs):
            counts[name] += 1
            return method(self, *args, **kwargs)

        return call

    for name, method in saved.items():
        setattr(torch.Tensor, name, counting(name, method))
    try:
        yield counts
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def test_one_host_sync_per_forward():
    """SPEC 3's loop and SPEC 6's read one status per forward (and the tokens at the end)."""
    model = boosted("qwen2", 30.0)
    prompts = [prompt(n) for n in LENGTHS]
    runs = {
        "diffusion": lambda: generate(
            model,
            prompts,
            mask_token_id=MASK_ID,
            stop_token_id=NO_STOP,
            block_size=BLOCK,
            sub_block_size=4,
            threshold=0.9,
            max_new_tokens=MAX_NEW,
            use_sub_block_cache=True,
        ),  # fmt: skip
        **{
            f"verified {c} {d}": lambda c=c, d=d: verified(model, prompts, context=c, draft=d)
            for c, d in itertools.product(CONTEXTS, DRAFTS)
        },
    }
    for name, run in runs.items():
        with host_syncs() as counts:
            result = run()
        assert sum(counts.values()) <= result.forwards + 2, (name, dict(counts))


# Trained tiny exports (a few steps from the tiny AR model): the embedded default's recipe (the
# AR term, the one-cache variant), and the paper's recipe (no AR term, two caches).
TRAINED = {
    "one_cache": ["diffusion.context=causal"],
    "paper": ["diffusion.ar_weight=0", "diffusion.context=block_causal"],
}


@pytest.fixture(scope="module")
def trained(artifacts, tmp_path_factory) -> dict[str, Path]:
    exports = {}
    for name, overrides in TRAINED.items():
        run_dir = tmp_path_factory.mktemp(f"verified_{name}")
        run_train(
            run_dir, "experiment=tiny", f"paths.artifacts_dir={artifacts}",
            f"paths.export_dir={run_dir}/export", "trainer.max_steps=4",
            "trainer.val_check_interval=4", *overrides,
        )  # fmt: skip
        exports[name] = run_dir
    return exports


@pytest.mark.slow
def test_trained_exports_decode_exactly_like_ar(trained, caplog):
    bench = get("synthetic", n=4)
    problems = bench.load()
    decode = DecodeSettings.defaults() | {"max_new_tokens": 40}
    for name, run_dir in trained.items():
        settings = read_settings(str(run_dir / "export"))
        assert settings["context"] == ("causal" if name == "one_cache" else "block_causal")
        export = load_export(str(run_dir / "export"), dtype=torch.float64)
        tokenizer, model = export.tokenizer, export.model
        prompts = [tokenizer(t, add_special_tokens=False)["input_ids"]
                   for t in render_prompts(tokenizer, bench, problems)]  # fmt: skip
        ar = make_decoder(export, decode, decoder="ar").generate(prompts)
        stop = settings["stop_token_id"]
        assert ar.tokens == [greedy_reference(model, p, max_new=40, stop=stop) for p in prompts]
        for draft in DRAFTS:
            decoder = make_decoder(export, decode | {"draft": draft}, decoder="verified")
            assert decoder.generate(prompts).tokens == ar.tokens, (name, draft)
        assert [decoder.generate([p]).tokens[0] for p in prompts] == ar.tokens
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="src.decoding.decoder"):
            evaluation = evaluate(decoder, bench, problems, batch_size=4)
        metrics = evaluation.metrics("accuracy")
        assert sum(metrics["forwards_by_kind"].values()) == metrics["forwards"]
        assert metrics["acceptance_length"] >= 1
        untrained = [r.message for r in caplog.records if "was not trained" in r.message]
        if name == "paper":  # one line, with the acceptance it measured
            assert len(untrained) == 1
            assert f"{metrics['acceptance_length']:.2f} tokens accepted" in untrained[0]
        else:
            assert not untrained


@pytest.mark.slow
def test_load_decoder_and_resume_take_the_context(trained, artifacts):
    one_cache = trained["one_cache"]
    decoder = load_decoder(str(one_cache / "export"), DecodeSettings.defaults(),
                           decoder="verified", device="cpu")  # fmt: skip
    assert decoder.name == "verified" and decoder.causal_mode_trained
    hparams = json.loads((one_cache / "export" / "diffusion.json").read_text())
    assert hparams["context"] == "causal" and hparams["ar_weight"] == 0.5
    with pytest.raises(ConfigError, match="decoder=verified is greedy"):
        make_decoder(decoder.export, DecodeSettings.defaults() | {"temperature": 0.7},
                     decoder="verified")  # fmt: skip
    with pytest.raises(ConfigError, match="use_sub_block_cache=false"):
        make_decoder(decoder.export, DecodeSettings.defaults() | {"use_sub_block_cache": True},
                     decoder="verified")  # fmt: skip
    # The run directory was trained with context=causal: resuming it with the paper's is refused.
    refused = subprocess.run(
        [sys.executable, "-m", "src.train", f"hydra.run.dir={one_cache}", *SMALL,
         "experiment=tiny", "diffusion.context=block_causal", f"paths.artifacts_dir={artifacts}",
         f"paths.export_dir={one_cache}/export", "trainer.max_steps=6"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert refused.returncode != 0
    last = refused.stderr.strip().splitlines()[-1]
    assert "diffusion.context='causal' (this run: 'block_causal')" in last
