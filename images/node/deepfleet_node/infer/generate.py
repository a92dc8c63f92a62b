"""Generation: one prompt, each mode's share of the prompts, and the plain transformers
reference that greedy output must equal."""

from __future__ import annotations

import argparse
import math
from typing import Any

from .distributed import next_prompts
from .prompts import result
from .text import cut_at_stop, encode_prompt


def reference_generate(model_dir: str, prompts: list[str], max_new_tokens: int) -> list[dict]:
    """What greedy infer output must equal: stock transformers, one process, no DeepSpeed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rows = []
    for index, prompt in enumerate(prompts):
        enc = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        rows.append(result(index, prompt, tokenizer, out[0, enc["input_ids"].shape[1] :]))
    return rows


def generation_kwargs(args: argparse.Namespace, tokenizer) -> dict[str, Any]:
    sample = not args.greedy and (args.temperature is not None or args.top_p is not None)
    kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": sample}
    if sample:
        kwargs["temperature"] = args.temperature if args.temperature is not None else 1.0
        kwargs["top_p"] = args.top_p if args.top_p is not None else 1.0
    stops = [s for s in args.stop if s]  # "" would match at once and stop at one token
    if stops:
        # Ends generation early; the text is still cut at the stop string afterwards.
        kwargs.update(stop_strings=stops, tokenizer=tokenizer)
    if args.mode != "replicas":
        # Every forward pass is collective here (all-reduce in tp, parameter all-gather in
        # zero), so a rank whose sequence ended must keep stepping until all have ended.
        kwargs["synced_gpus"] = True
    return kwargs


def generate_one(generator, device, tokenizer, args, index: int, prompt: str) -> dict:
    import torch
    from transformers import set_seed

    # Seeded per prompt, so sampled text does not depend on which rank got the prompt,
    # and in tp every rank draws the same token from the same (all-reduced) logits.
    set_seed(args.seed + index)
    enc = {k: v.to(device) for k, v in encode_prompt(tokenizer, prompt, args.chat).items()}
    with torch.no_grad():
        out = generator.generate(**enc, **generation_kwargs(args, tokenizer))
    row = result(index, prompt, tokenizer, out[0, enc["input_ids"].shape[1] :].cpu())
    row["completion"] = cut_at_stop(row["completion"], args.stop)
    return row


def keep_in_step(generator, device, tokenizer) -> None:
    """A throwaway generate, so a zero rank with no prompt left joins its peers' passes.

    One new token is enough: synced_gpus keeps this rank stepping for as long as any
    peer is still generating, and no longer.
    """
    import torch

    enc = {k: v.to(device) for k, v in tokenizer("", return_tensors="pt").items()}
    if enc["input_ids"].shape[1] == 0:  # a tokenizer that adds no BOS
        enc = {k: v.to(device) for k, v in tokenizer(" ", return_tensors="pt").items()}
    with torch.no_grad():
        generator.generate(**enc, max_new_tokens=1, do_sample=False, synced_gpus=True)


def generate_rows(args, generator, device, tokenizer, prompts, rank, world) -> list[dict]:
    """This rank's rows: taken from a shared queue for replicas, round-robin for zero
    (its ranks must step together), every prompt for tp."""
    if args.mode == "tp":
        return [
            generate_one(generator, device, tokenizer, args, i, p) for i, p in enumerate(prompts)
        ]
    if args.mode == "replicas":
        return [
            generate_one(generator, device, tokenizer, args, i, prompts[i])
            for i in next_prompts(len(prompts), world)
        ]
    mine = [(i, p) for i, p in enumerate(prompts) if i % world == rank]
    rows = [generate_one(generator, device, tokenizer, args, i, p) for i, p in mine]
    if args.mode == "zero":
        # Every rank must call generate equally often: the collectives inside pair up.
        for _ in range(math.ceil(len(prompts) / world) - len(mine)):
            keep_in_step(generator, device, tokenizer)
    return rows


def generation_line(rows: list[dict], seconds: float, world: int) -> str:
    """What `make bench` reads: new tokens over the generation alone (launch and load
    excluded), every rank together."""
    tokens = sum(row["tokens"] for row in rows)
    rate = tokens / seconds if seconds > 0 else 0.0
    return f"generated {tokens} tokens in {seconds:.2f}s ({rate:.1f} tok/s, {world} ranks)"
