"""The replica's model: on the GPUs asked for (one, or several for a model too big for
one) or the CPU, in the dtype asked for or the node's precision rule."""

from __future__ import annotations

import argparse
from typing import Any

# Of each GPU's free memory, what a model split over several may fill with weights; the
# rest is for the KV cache and activations while generating.
WEIGHT_SHARE = 0.9


def pick_gpus(requested: list[int] | None) -> list[int]:
    """[] for the CPU; ROCm builds of torch answer through torch.cuda too."""
    import torch

    if requested is None:
        return [0] if torch.cuda.is_available() else []
    if not torch.cuda.is_available():
        raise SystemExit(f"serve: --gpus {','.join(map(str, requested))}: torch sees no GPU")
    count = torch.cuda.device_count()
    missing = [g for g in requested if g >= count]
    if missing:
        raise SystemExit(f"serve: --gpus: no GPU {missing} here (torch sees {count})")
    return requested


def pick_dtype(requested: str, gpus: list[int]) -> str:
    """--dtype as given; auto: the node's precision rule (deepfleet_node.precision) over
    the replica's GPUs: fp32 on the CPU, bf16 when every one has it natively, else fp16."""
    if requested != "auto":
        return requested
    from ..precision import gpu_facts, job_precision

    return job_precision(gpu_facts(g) for g in gpus)


def load_model(args: argparse.Namespace):
    """(model in eval mode, the device its inputs go to, GPU indices, dtype name)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..precision import torch_dtype

    gpus = pick_gpus(args.gpus)
    dtype_name = pick_dtype(args.dtype, gpus)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype_name)}
    if len(gpus) == 1:
        # Straight onto the GPU, without a whole copy in host memory first.
        kwargs["device_map"] = {"": gpus[0]}
    elif gpus:
        # Only these GPUs: no CPU entry, so a model that does not fit fails to load
        # instead of silently running partly on the CPU. Free memory is read on these
        # GPUs alone (accelerate's get_max_memory would open a context on every GPU,
        # the other replicas' included).
        budget = {g: int(torch.cuda.mem_get_info(g)[0] * WEIGHT_SHARE) for g in gpus}
        kwargs.update(device_map="auto", max_memory=budget)
    model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs).eval()
    device = model.get_input_embeddings().weight.device
    return model, device, gpus, dtype_name
