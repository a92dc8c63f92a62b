"""Size up a HF model from its config alone, without loading (or even downloading) weights.

    python -m deepfleet_node.modelinfo --model DIR_or_hub_name

prints one JSON object: model_type, params, largest_layer_params, bytes_per_param,
weights_bytes, layers, hidden_size, heads, kv_heads, head_dim, vocab_size, max_positions.
The parameter count comes from building the model on PyTorch's meta device, where
tensors have shapes but no storage, so a 70B config takes well under a second and a few
hundred MB of RAM (mostly the imports). inference_memory_bytes() turns that into a
per-model memory estimate for deciding between infer's replicas, tp and zero modes.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

# Config dtypes by storage size; anything else (or none given) counts as half precision,
# the dtype nearly every published checkpoint uses.
DTYPE_BYTES = {
    "float64": 8,
    "float32": 4,
    "float": 4,
    "float16": 2,
    "half": 2,
    "bfloat16": 2,
    "int8": 1,
    "uint8": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}
DEFAULT_BYTES_PER_PARAM = 2


def config_dtype_bytes(config) -> int:
    # transformers 5 calls it `dtype`; configs written by 4.x say `torch_dtype`. Read the
    # raw attributes so the 4.x name does not trigger transformers' deprecation warning.
    raw = vars(config)
    dtype = raw.get("dtype") or raw.get("torch_dtype")
    name = str(dtype).removeprefix("torch.") if dtype is not None else ""
    return DTYPE_BYTES.get(name, DEFAULT_BYTES_PER_PARAM)


def load_config(model: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)


def count_params(config, trust_remote_code: bool = False) -> tuple[int, int]:
    """(parameters, largest layer's parameters) of the causal LM this config describes,
    counted on the meta device.

    Tied weights (e.g. input and output embeddings) are one parameter and count once,
    as in the real model's parameters(). The largest layer is the module with the most
    parameters of its own, as DeepSpeed's ZeRO-3 estimator counts it (it is gathered whole).
    """
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        except ValueError:  # a config with no causal-LM head class: count the base model
            model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    largest = max(
        (sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0
    )
    return sum(p.numel() for p in model.parameters()), largest


def model_info(model_or_config, trust_remote_code: bool = False) -> dict[str, Any]:
    """The JSON that `python -m deepfleet_node.modelinfo` prints, for a name, dir or config."""
    if isinstance(model_or_config, str):
        config = load_config(model_or_config, trust_remote_code)
    else:
        config = model_or_config
    # Multimodal configs nest the language model's shape in a text config.
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    params, largest = count_params(config, trust_remote_code)
    bytes_per_param = config_dtype_bytes(config)
    heads = int(text.num_attention_heads)
    hidden = int(text.hidden_size)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    return {
        "model_type": config.model_type,
        "params": int(params),
        "largest_layer_params": int(largest),
        "bytes_per_param": bytes_per_param,
        "weights_bytes": int(params) * bytes_per_param,
        "layers": int(text.num_hidden_layers),
        "hidden_size": hidden,
        "heads": heads,
        "kv_heads": int(kv_heads),
        "head_dim": int(head_dim),
        "vocab_size": int(text.vocab_size),
        "max_positions": getattr(text, "max_position_embeddings", None),
    }


def kv_cache_bytes(info: dict[str, Any], dtype_bytes: int, batch: int = 1, seq: int = 2048) -> int:
    """K and V for every layer, kv-head and position of `batch` sequences of `seq` tokens."""
    head_dim = info.get("head_dim") or info["hidden_size"] // info["heads"]
    per_token = 2 * info["layers"] * info["kv_heads"] * head_dim * dtype_bytes
    return per_token * batch * seq


def inference_memory_bytes(
    info: dict[str, Any], dtype_bytes: int, batch: int = 1, seq: int = 2048
) -> int:
    """Bytes to generate with the model `info` describes (from model_info) in one place.

    weights: params x dtype_bytes (the dtype inference runs in, which need not be the
        checkpoint's: 2 for bf16/fp16, 4 for fp32).
    KV cache: 2 (K and V) x layers x kv_heads x head_dim x dtype_bytes per token, for
        `batch` sequences of `seq` tokens (prompt plus generated), so grouped-query
        attention's smaller cache is counted as such.

    Not included: activations (a few hidden-size vectors per token, small next to the KV
    cache when generating one token at a time, but a prefill of a long prompt briefly
    needs seq x hidden-size per layer and seq x seq attention scores without a fused
    kernel), the CUDA/ROCm context (several hundred MB per GPU), allocator
    fragmentation, and sliding-window or paged caches that hold less. Leave 10-20 %
    headroom. Under tp the weights and the KV cache split evenly over the ranks (KV
    heads permitting); under zero only the weights split, and each rank also needs its
    largest layer gathered whole while it runs.
    """
    return info["params"] * dtype_bytes + kv_cache_bytes(info, dtype_bytes, batch, seq)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m deepfleet_node.modelinfo",
        description="Print a model's size and shape as JSON, from its config alone.",
    )
    p.add_argument("--model", required=True, help="local model dir or hub name")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow configs with custom code"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from transformers.utils import logging

    # Only the JSON on stdout: callers parse it.
    logging.set_verbosity_error()
    print(json.dumps(model_info(args.model, args.trust_remote_code)), flush=True)


if __name__ == "__main__":
    main()
