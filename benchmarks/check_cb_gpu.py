"""Continuous batching (``model.generate_batch``) on a patched tiny model on the GPU: where the time goes.

On the H200 (transformers 5.17) ``tests/test_varlen.py::test_gpu_generate_batch_runs_the_packed_kernel`` ran past
its 200 s limit without a word. A flash-named implementation turns on CUDA graphs there, and with them a warmup
that captures the varlen path at the cache's largest size. This script runs generate_batch under a few
continuous-batching configs, one after the other, and prints per run: seconds, the first tokens against the
unpatched model's, and the shapes of every varlen call (sequences, max q rows, max keys, packed rows). A stack of
every thread is dumped if one run takes longer than ``--hang-after`` seconds (faulthandler), then the process
exits.

    python benchmarks/check_cb_gpu.py --hang-after 90
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hang-after", type=float, default=90.0)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run (float32, no CUDA graphs)")
    parser.add_argument("--runs", nargs="+", default=["bounded", "bounded-no-graphs", "default"],
                        choices=["bounded", "bounded-no-graphs", "default"])
    args = parser.parse_args(argv)

    import transformers
    from transformers import ContinuousBatchingConfig, GenerationConfig
    from transformers.utils import logging as hf_logging

    from hf_tiny import EXACT, random_ids, tiny_model

    import flexprefill_hf.ops.varlen as varlen
    from flexprefill_hf.integration import unpatch_model
    from flexprefill_hf.integration.continuous_batching import patch_model_for_continuous_batching

    hf_logging.set_verbosity_info()
    on_gpu = args.device == "cuda"
    where = torch.cuda.get_device_name() if on_gpu else "cpu"
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {where}")
    shapes = []
    real = varlen.flexprefill_attention_varlen_with_stats

    def recording(q, k, v, cu_q, cu_k, max_q, max_k, *rest, **kw):
        # Python values only: no host sync inside a captured graph.
        shapes.append((cu_q.shape[0] - 1, int(max_q), int(max_k), q.shape[0], k.shape[0]))
        return real(q, k, v, cu_q, cu_k, max_q, max_k, *rest, **kw)

    varlen.flexprefill_attention_varlen_with_stats = recording
    model = tiny_model("llama").to(args.device, torch.float16 if on_gpu else torch.float32).eval()
    prompts = [random_ids(n, seed=20 + i)[0].tolist() for i, n in enumerate((900, 60, 500))]
    generation = GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    configs = {
        "bounded": ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=1024),
        "bounded-no-graphs": ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=1024, use_cuda_graph=False),
        "default": None,
    }

    def generate(config):
        with torch.no_grad():
            out = model.generate_batch(prompts, generation, continuous_batching_config=config, progress_bar=False)
        return [out[f"req_{i}"].generated_tokens for i in range(len(prompts))]

    want = generate(configs["bounded-no-graphs"])
    patch_model_for_continuous_batching(model, cuda_dense_below=0, **EXACT)
    for name in args.runs:
        shapes.clear()
        faulthandler.dump_traceback_later(args.hang_after, exit=True)
        started = time.perf_counter()
        got = generate(configs[name])
        if on_gpu:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        faulthandler.cancel_dump_traceback_later()
        row = dict(run=name, seconds=round(seconds, 2), first_tokens_agree=[g[:1] for g in got] == [w[:1] for w in want],
                   calls=len(shapes), largest=max(shapes, key=lambda s: s[2]) if shapes else None,
                   shapes=sorted(set(shapes))[:12])
        print(json.dumps(row), flush=True)
    unpatch_model(model)


if __name__ == "__main__":
    main()
