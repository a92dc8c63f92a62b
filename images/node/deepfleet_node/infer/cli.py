"""Batch text generation with a HF causal LM: one process, replicas, tensor or ZeRO-3 parallel.

    python -m deepfleet_node.infer --model DIR --prompt "Hello" --output out.jsonl
    deepspeed --hostfile H --module deepfleet_node.infer --model DIR --prompts p.jsonl ...

--mode picks how the ranks started by the launcher share the work:

  replicas  every rank loads a full copy of the model and takes the next prompt from a
            queue all ranks share, so a faster machine takes more (the default;
            throughput scales with ranks, each must fit the whole model; the ranks may
            sit on different accelerators, talking over gloo)
  tp        AutoTP tensor parallelism: each rank holds a slice of every layer and all
            ranks run every prompt in lock-step (for one node whose devices are too small)
  zero      ZeRO-3 inference: each rank holds 1/world of the weights and gathers each
            layer just before using it; ranks take prompts round-robin and step together
            (for models too large for one node, at the price of moving every layer's
            weights over the network on every forward pass)

In every mode rank 0 gathers and writes the results in input order. --reference runs the
plain single-process transformers generate() that greedy results must match.
"""

from __future__ import annotations

import argparse
import time

from .. import ranksetup
from .._log import say
from ..precision import PRECISIONS
from .distributed import (
    check_ranks_agree,
    gather_rows,
    init_distributed,
    remove_shm_segment,
    uses_shm_allreduce,
)
from .generate import generate_rows, generation_line, reference_generate
from .loading import load_generator
from .prompts import read_prompts, show, write_jsonl

MODES = ("replicas", "tp", "zero")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="deepfleet_node.infer", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="local model dir or hub name")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", nargs="+", action="extend", help="prompt text (repeatable)")
    source.add_argument("--prompts", help='.jsonl with "prompt" per line, or .txt one per line')
    p.add_argument("--output", required=True, help="JSONL: index, prompt, completion, tokens")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--greedy", action="store_true", help="greedy decoding (the default)")
    p.add_argument("--temperature", type=float, help="sample at this temperature")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (per prompt: seed+index)")
    p.add_argument("--stop", nargs="+", action="extend", default=[], help="cut at these strings")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    p.add_argument("--dtype", choices=("auto", *PRECISIONS), default="auto")
    p.add_argument(
        "--mode",
        choices=MODES,
        default="replicas",
        help="replicas: a full model per rank; tp: tensor parallel; zero: ZeRO-3 sharded",
    )
    p.add_argument(
        "--no-deepspeed", action="store_true", help="skip deepspeed.init_inference (replicas)"
    )
    p.add_argument(
        "--reference",
        action="store_true",
        help="plain single-process from_pretrained().generate(), greedy, for comparisons",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.no_deepspeed and args.mode != "replicas":
        p.error(f"--no-deepspeed: --mode {args.mode} is DeepSpeed itself")
    return args


def run(args: argparse.Namespace) -> None:
    rank, world = init_distributed(args.mode, args.local_rank)
    ranksetup.quiet_libraries(verbose=False)
    prompts = read_prompts(args)
    generator, device, _keep_alive, tokenizer = load_generator(args, world)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # generation is timed from when every rank has its model
    began = time.perf_counter()
    rows = generate_rows(args, generator, device, tokenizer, prompts, rank, world)
    if args.mode == "tp":
        merged = check_ranks_agree(rows, rank, world)
    else:
        merged = gather_rows(rows, rank, world)
    if merged is not None:
        seconds = time.perf_counter() - began
        write_jsonl(args.output, merged)
        show(merged)
        say(generation_line(merged, seconds, world))
        say(f"wrote {len(merged)} completions to {args.output}")

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        if device.type == "cpu" and uses_shm_allreduce(args.mode):
            remove_shm_segment(rank)
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if args.reference:
        rows = reference_generate(args.model, read_prompts(args), args.max_new_tokens)
        write_jsonl(args.output, rows)
        show(rows)
        return
    run(args)
