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
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from . import ranksetup
from ._log import exit_after_success, say
from .zero3 import zero3_loading

MODES = ("replicas", "tp", "zero")
BACKEND_ENV = "DEEPFLEET_BACKEND"  # set by the operator's plan (plan.BACKENDS)
QUEUE_KEY = "deepfleet/next-prompt"


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


def init_distributed(mode: str, local_rank: int | None) -> tuple[int, int]:
    """(rank, world). Replicas need no process group on one rank; tp and zero always do."""
    if mode == "replicas" and world_size() == 1:
        return 0, 1
    rank, world, _ = ranksetup.init_distributed(
        local_rank, backend=planned_backend(), shm_allreduce=uses_shm_allreduce(mode)
    )
    return rank, world


def planned_backend() -> str | None:
    """gloo when the operator planned a world of several accelerators (DEEPFLEET_BACKEND=gloo
    beside a GPU): NCCL cannot reach a CPU rank, gloo reaches every rank through host
    memory. None: the accelerator's own backend."""
    return "gloo" if os.environ.get(BACKEND_ENV) == "gloo" else None


def uses_shm_allreduce(mode: str) -> bool:
    """Whether DeepSpeed's CPU shared-memory all-reduce can and should serve this run.

    Only AutoTP's all-reduce goes through it, and the op only sets up its shared buffers
    when LOCAL_SIZE (set by the launcher) equals WORLD_SIZE, i.e. every rank is on one
    host. Otherwise (ranks on several nodes, or started without the launcher) it reduces
    through buffers it never set up and segfaults (DeepSpeed 0.19.8,
    csrc/cpu/comm/shm_interface.cpp).
    """
    single_host = os.environ.get("LOCAL_SIZE") == os.environ.get("WORLD_SIZE", "1")
    return mode == "tp" and single_host and world_size() > 1


def remove_shm_segment(rank: int) -> None:
    """Unlink this rank's DeepSpeed all-reduce segment, once no rank will touch it again.

    DeepSpeed names it after uid, MASTER_ADDR, MASTER_PORT and rank and never unlinks
    it, and node containers share the host's /dev/shm (ipc: host), so every run on a new
    port would leave 66 MiB per rank of RAM-backed tmpfs behind. The mappings stay valid
    until exit; if a DeepSpeed version names it differently this does nothing.
    """
    name = "_".join(
        [
            "deepspeed_allreduce_buffer",
            str(os.getuid()),
            os.environ.get("MASTER_ADDR", ""),
            os.environ.get("MASTER_PORT", ""),
            str(rank),
        ]
    )
    Path("/dev/shm", name).unlink(missing_ok=True)


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


def accelerator_device():
    import torch
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return torch.device(acc.current_device_name() if acc.device_name() != "cpu" else "cpu")


def load_generator(args: argparse.Namespace, world: int = 1):
    """(object with .generate, its device, what must stay alive meanwhile, tokenizer)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dtype = pick_dtype(args.dtype)
    device = accelerator_device()
    if args.mode == "zero":
        return (*load_zero(args.model, dtype, device), tokenizer)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    if args.mode == "tp":
        return wrap_tensor_parallel(model, dtype, world), device, None, tokenizer
    if args.no_deepspeed:
        return model.to(device), device, None, tokenizer
    return wrap_inference(model, dtype, device), device, None, tokenizer


def max_tokens(model) -> int:
    # InferenceEngine.generate refuses prompts longer than this (default 1024) even
    # without kernel injection; the model's own limit is the real one.
    return max(1024, int(getattr(model.config, "max_position_embeddings", 0) or 0))


def wrap_inference(model, dtype, device):
    """deepspeed.init_inference without kernel injection, or the plain model if it fails."""
    import deepspeed

    try:
        engine = deepspeed.init_inference(
            model, dtype=dtype, replace_with_kernel_inject=False, max_tokens=max_tokens(model)
        )
    except Exception as exc:  # noqa: BLE001 - any failure here has the same fallback
        say(f"note: deepspeed.init_inference unavailable ({exc}); using the plain model")
        return model.to(device)
    say(f"using deepspeed.init_inference ({dtype}, no kernel injection)")
    return engine


def wrap_tensor_parallel(model, dtype, world: int):
    """AutoTP: DeepSpeed slices the linear layers over `world` ranks and all-reduces.

    No fallback here, unlike replicas: a plain model on every rank would silently be
    `world` replicas doing the same work.
    """
    import deepspeed

    engine = deepspeed.init_inference(
        model,
        tensor_parallel={"tp_size": world},
        dtype=dtype,
        replace_with_kernel_inject=False,
        max_tokens=max_tokens(model),
    )
    say(f"using deepspeed.init_inference AutoTP, tp_size {world} ({dtype})")
    return engine


def zero_inference_config(dtype, device) -> dict[str, Any]:
    """A DeepSpeed config for ZeRO-3 with no optimizer: parameter partitioning only."""
    import torch

    zero: dict[str, Any] = {"stage": 3}
    if device.type == "cpu":
        # No side streams to overlap with on CPU.
        zero["overlap_comm"] = False
    return {
        # Required by deepspeed.initialize even though nothing is trained.
        "train_micro_batch_size_per_gpu": 1,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "zero_optimization": zero,
    }


def load_zero(model_name: str, dtype, device):
    """(ZeRO-3 engine's module, device, what must stay alive while generating)."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    ds_config = zero_inference_config(dtype, device)
    keep_alive = zero3_loading(ds_config)
    model = AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype)
    partitioned = hasattr(next(model.parameters()), "ds_id")
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.module.eval()
    how = "built under zero.Init" if partitioned else "loaded whole, then partitioned"
    say(f"using ZeRO-3 inference ({dtype}); weights {how}")
    return engine.module, engine.device, keep_alive


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


def encode_prompt(tokenizer, prompt: str, chat: bool):
    if not chat:
        return tokenizer(prompt, return_tensors="pt")
    if not tokenizer.chat_template:
        raise SystemExit("--chat: this model's tokenizer has no chat template")
    return encode_chat(tokenizer, [{"role": "user", "content": prompt}])


def encode_chat(tokenizer, messages: list[dict]):
    """Messages through the model's chat template (infer --chat, and serve's chat requests)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The template writes its own special tokens (e.g. BOS); don't add a second set.
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)


def cut_at_stop(text: str, stops: list[str]) -> str:
    cuts = [text.find(s) for s in stops if s and s in text]
    return text[: min(cuts)] if cuts else text


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


def check_ranks_agree(rows: list[dict], rank: int, world: int) -> list[dict] | None:
    """tp: every rank generated every prompt; rank 0 gets the rows once all ranks match.

    A mismatch means the ranks fed different tokens into the same all-reduces, so the
    text is not what the model would have produced: fail, on every rank, rather than
    write it.
    """
    if world == 1:
        return rows
    import torch.distributed as dist

    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, rows)
    bad = sorted(
        {
            mine["index"]
            for part in parts[1:]
            for mine, theirs in zip(parts[0], part, strict=True)
            if mine != theirs
        }
    )
    if bad:
        raise RuntimeError(f"tensor-parallel ranks generated different text for prompts {bad}")
    return rows if rank == 0 else None


def next_prompts(count: int, world: int):
    """Prompt indices for this replica, taken one at a time from a counter every rank
    shares (the process group's own store): a rank twice as fast takes twice as many, so
    unlike machines finish together."""
    if world == 1:
        yield from range(count)
        return
    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()
    while (index := store.add(QUEUE_KEY, 1) - 1) < count:
        yield index


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


if __name__ == "__main__":
    main()
    exit_after_success()
