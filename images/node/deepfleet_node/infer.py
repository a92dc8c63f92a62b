"""Batch text generation with a HF causal LM, on one process or as replicas.

    python -m deepfleet_node.infer --model DIR --prompt "Hello" --output out.jsonl
    deepspeed --hostfile H --module deepfleet_node.infer --model DIR --prompts p.jsonl ...

Under the launcher every rank loads a full copy of the model ("replicas"), takes prompts
round-robin, and rank 0 gathers and writes the results in input order. --reference runs
the plain single-process transformers generate() that greedy results must match.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from ._log import say


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
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument("--no-deepspeed", action="store_true", help="skip deepspeed.init_inference")
    p.add_argument(
        "--reference",
        action="store_true",
        help="plain single-process from_pretrained().generate(), greedy, for comparisons",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------- prompts and output


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt:
        return list(args.prompt)
    path = Path(args.prompts)
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":
        return [json.loads(line)["prompt"] for line in lines if line.strip()]
    return [line for line in lines if line.strip()]


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def show(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        # One line per prompt, so newlines are escaped for anyone grepping the log.
        prompt = row["prompt"].replace("\n", "\\n")
        completion = row["completion"].replace("\n", "\\n")
        say(f"[{row['index']}] {prompt} => {completion}")


def result(index: int, prompt: str, tokenizer, new_tokens) -> dict[str, Any]:
    return {
        "index": index,
        "prompt": prompt,
        "completion": tokenizer.decode(new_tokens, skip_special_tokens=True),
        "tokens": int(len(new_tokens)),
    }


# ---------------------------------------------------------------- reference


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


# ---------------------------------------------------------------- generation


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_replicas(local_rank: int | None) -> tuple[int, int]:
    """(rank, world); a process group only when the launcher started several ranks."""
    if world_size() == 1:
        return 0, 1
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() != "cpu":
        acc.set_device(local_rank if local_rank is not None else int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend=acc.communication_backend_name())
    return dist.get_rank(), dist.get_world_size()


def pick_dtype(requested: str):
    import torch
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if requested == "auto":
        if acc.device_name() == "cpu":
            requested = "fp32"
        else:
            requested = "bf16" if acc.is_bf16_supported() else "fp16"
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[requested]


def load_generator(args: argparse.Namespace):
    """(callable with .generate, its device, tokenizer)."""
    import torch
    from deepspeed.accelerator import get_accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dtype = pick_dtype(args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    acc = get_accelerator()
    device = torch.device(acc.current_device_name() if acc.device_name() != "cpu" else "cpu")
    if args.no_deepspeed:
        return model.to(device), device, tokenizer
    return wrap_inference(model, dtype, device), device, tokenizer


def wrap_inference(model, dtype, device):
    """deepspeed.init_inference without kernel injection, or the plain model if it fails."""
    import deepspeed

    try:
        engine = deepspeed.init_inference(model, dtype=dtype, replace_with_kernel_inject=False)
    except Exception as exc:  # noqa: BLE001 - any failure here has the same fallback
        say(f"note: deepspeed.init_inference unavailable ({exc}); using the plain model")
        return model.to(device)
    say(f"using deepspeed.init_inference ({dtype}, no kernel injection)")
    return engine


def generation_kwargs(args: argparse.Namespace, tokenizer) -> dict[str, Any]:
    sample = not args.greedy and (args.temperature is not None or args.top_p is not None)
    kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": sample}
    if sample:
        kwargs["temperature"] = args.temperature if args.temperature is not None else 1.0
        kwargs["top_p"] = args.top_p if args.top_p is not None else 1.0
    if args.stop:
        # Ends generation early; the text is still cut at the stop string afterwards.
        kwargs.update(stop_strings=list(args.stop), tokenizer=tokenizer)
    return kwargs


def encode_prompt(tokenizer, prompt: str, chat: bool):
    if not chat:
        return tokenizer(prompt, return_tensors="pt")
    if not tokenizer.chat_template:
        raise SystemExit("--chat: this model's tokenizer has no chat template")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    # The template writes its own special tokens (e.g. BOS); don't add a second set.
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)


def cut_at_stop(text: str, stops: list[str]) -> str:
    cuts = [text.find(s) for s in stops if s and s in text]
    return text[: min(cuts)] if cuts else text


def generate_one(generator, device, tokenizer, args, index: int, prompt: str) -> dict:
    import torch
    from transformers import set_seed

    # Seeded per prompt, so sampled text does not depend on which rank got the prompt.
    set_seed(args.seed + index)
    enc = {k: v.to(device) for k, v in encode_prompt(tokenizer, prompt, args.chat).items()}
    with torch.no_grad():
        out = generator.generate(**enc, **generation_kwargs(args, tokenizer))
    row = result(index, prompt, tokenizer, out[0, enc["input_ids"].shape[1] :].cpu())
    row["completion"] = cut_at_stop(row["completion"], args.stop)
    return row


def gather_rows(rows: list[dict], rank: int, world: int) -> list[dict] | None:
    """Every rank's rows on rank 0, in prompt order; None elsewhere."""
    if world == 1:
        return sorted(rows, key=lambda r: r["index"])
    import torch.distributed as dist

    parts: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(rows, parts, dst=0)
    if rank != 0:
        return None
    return sorted((row for part in parts for row in part), key=lambda r: r["index"])


def run(args: argparse.Namespace) -> None:
    rank, world = init_replicas(args.local_rank)
    prompts = read_prompts(args)
    generator, device, tokenizer = load_generator(args)
    mine = [(i, p) for i, p in enumerate(prompts) if i % world == rank]
    rows = [generate_one(generator, device, tokenizer, args, i, p) for i, p in mine]
    merged = gather_rows(rows, rank, world)
    if merged is not None:
        write_jsonl(args.output, merged)
        show(merged)
        say(f"wrote {len(merged)} completions to {args.output}")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
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


if __name__ == "__main__":
    main()
