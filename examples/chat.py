"""Chat with a model whose prefill is FlexPrefill, keeping the KV cache between turns.

Every turn after the first is a prefill on top of the cache: only the new user message (and the chat
template around it) is computed. Tokens are streamed as they are generated. Lines are read from standard
input until EOF, so a conversation can also be piped in:

    python examples/chat.py --stats
    printf 'Hi!\\nWhat did I just say?\\n' | python examples/chat.py --max-new-tokens 64
    python examples/chat.py --context report.txt --stats    # a long document before the first question
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
from transformers import DynamicCache, TextStreamer

import flexprefill_hf
from flexprefill_hf.models import cache_kwarg

# The examples' shared argument checks (examples/_cli.py: this script's folder is on sys.path).
from _cli import add_model_arguments, int_at_least, load


class Chat:
    """A conversation whose tokens so far are all in ``self.cache``."""

    def __init__(self, model, tokenizer, max_new_tokens: int, record_stats: bool):
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.record_stats = record_stats
        self.messages = []
        self.cache = DynamicCache()
        self.cached_ids = torch.empty(1, 0, dtype=torch.long, device=model.device)  # [1, tokens in the cache]
        self.stats = None
        self.n_prefilled = (0, 0)  # (tokens cached before the last prefill, tokens it added)

    @torch.no_grad()
    def reply(self, user_text: str) -> str:
        self.messages.append({"role": "user", "content": user_text})
        input_ids = self.tokenizer.apply_chat_template(
            self.messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"].to(self.model.device)
        self._keep_common_prefix(input_ids)
        n_cached = self.cached_ids.shape[1]
        self.n_prefilled = (n_cached, input_ids.shape[1] - n_cached)

        # generate() prefills the uncached tokens on top of the cache, then decodes; record_stats keeps
        # the statistics of that prefill only.
        recording = flexprefill_hf.record_stats(self.model) if self.record_stats else contextlib.nullcontext()
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        with recording:
            output_ids = self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                streamer=streamer,
                pad_token_id=self.tokenizer.pad_token_id,
                **{cache_kwarg(self.model): self.cache},
            )
        self.stats = flexprefill_hf.last_stats(self.model) if self.record_stats else None
        # The cache holds every token but the last one generated (it was never fed back).
        self.cached_ids = output_ids[:, : self.cache.get_seq_length()]
        answer = self.tokenizer.decode(output_ids[0, input_ids.shape[1]:], skip_special_tokens=True).strip()
        self.messages.append({"role": "assistant", "content": answer})
        return answer

    def _keep_common_prefix(self, input_ids: torch.Tensor) -> None:
        """Drop from the cache what the chat template renders differently (e.g. the end of the last reply)."""
        n = min(self.cached_ids.shape[1], input_ids.shape[1] - 1)
        same = (self.cached_ids[0, :n] == input_ids[0, :n]).long()
        n_common = int(same.cumprod(0).sum())
        if n_common < self.cached_ids.shape[1]:
            self.cache.crop(n_common)
            self.cached_ids = self.cached_ids[:, :n_common]

    def describe_stats(self) -> str:
        n_cached, n_new = self.n_prefilled
        where = f"prefill of {n_new} tokens on top of {n_cached} cached"
        if not self.record_stats:
            return f"[{where}: dense attention (--dense)]"
        stats = [s for s in self.stats or () if s is not None and not s.dense]
        if not stats:
            return f"[{where}: dense attention (too short for FlexPrefill)]"
        fraction = torch.stack([s.computed_fraction.float().mean().cpu() for s in stats]).mean()
        query_aware = sum(int(s.query_aware.sum()) for s in stats)
        heads = sum(s.query_aware.numel() for s in stats)
        return f"[{where}: {fraction.item():.2f} of the blocks computed, {query_aware}/{heads} heads query-aware]"


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, every value checked before a model loads (argparse exits with status 2 on a bad one)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--dense", action="store_true", help="plain SDPA attention, to compare")
    parser.add_argument("--stats", action="store_true", help="print the sparsity of each turn's prefill")
    parser.add_argument("--max-new-tokens", type=int_at_least(1), default=256)
    parser.add_argument("--context", type=Path, default=None, help="a text file placed before the first message")
    args = parser.parse_args(argv)
    if args.context is not None and not args.context.is_file():
        parser.error(f"argument --context: {str(args.context)!r} is not a readable file; expected a text file")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    model, tokenizer = load(args)
    if not args.dense:
        flexprefill_hf.patch_model(model)
    chat = Chat(model, tokenizer, args.max_new_tokens, record_stats=not args.dense)
    context = args.context.read_text() + "\n\n" if args.context else ""

    interactive = sys.stdin.isatty()
    print(f"Chatting with {args.model or 'SmolLM2-135M-Instruct'} ({'dense' if args.dense else 'FlexPrefill'}); "
          "end with Ctrl-D.")
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            break
        if not interactive:
            print(line)
        if not line.strip():
            continue
        chat.reply(context + line)
        context = ""
        if args.stats:
            print(chat.describe_stats())


if __name__ == "__main__":
    main()
