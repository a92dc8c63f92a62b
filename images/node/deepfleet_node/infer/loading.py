"""The model per mode: a (DeepSpeed inference) replica, AutoTP slices, or ZeRO-3 shards;
in the dtype asked for or the node's own precision rule."""

from __future__ import annotations

import argparse
from typing import Any

from .._log import say
from ..zero3 import zero3_loading


def pick_dtype(requested: str):
    """--dtype's torch dtype; auto: the node's precision rule for this rank's device
    (deepfleet_node.precision.local_precision: fp32 on CPU, bf16 where native, else fp16)."""
    from ..precision import local_precision, torch_dtype

    if requested == "auto":
        requested = local_precision(accelerator_device())
    return torch_dtype(requested)


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
