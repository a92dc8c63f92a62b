"""deepfleet_node.modelinfo: model size and shape from the config alone."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

from nodetools import require

require("torch")
require("transformers")

from nodetools import SUBPROCESS_TIMEOUT_S, node_env  # noqa: E402

from deepfleet_node import modelinfo  # noqa: E402

KEYS = {"model_type", "params", "largest_layer_params", "bytes_per_param", "weights_bytes",
        "layers", "hidden_size", "heads", "kv_heads", "head_dim", "vocab_size",
        "max_positions"}  # fmt: skip

LLAMA2_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)
LLAMA3_70B = dict(
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=131072,
    tie_word_embeddings=False,
)


def llama(**shape):
    from transformers import LlamaConfig

    return LlamaConfig(**shape)


def test_cli_on_the_tiny_model_counts_its_real_parameters(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proc = subprocess.run(
        [sys.executable, "-m", "deepfleet_node.modelinfo", "--model", str(tiny_model)],
        env=node_env(),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(proc.stdout)  # stdout is the JSON and nothing else
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert set(info) == KEYS
    assert info["params"] == sum(p.numel() for p in model.parameters())
    # tiny saves fp32 weights, and its config says so
    assert info["bytes_per_param"] == 4
    assert info["weights_bytes"] == 4 * info["params"]
    assert info["model_type"] == "llama"
    assert (info["layers"], info["hidden_size"], info["heads"], info["kv_heads"]) == (2, 64, 4, 2)
    assert info["head_dim"] == 16
    assert info["vocab_size"] == len(AutoTokenizer.from_pretrained(tiny_model))
    assert info["max_positions"] == 512


def test_llama2_7b_shape():
    info = modelinfo.model_info(llama(**LLAMA2_7B))
    assert abs(info["params"] - 6.74e9) / 6.74e9 < 0.01
    assert info["params"] == 6_738_415_616  # Llama-2-7B's published count, exactly
    assert info["kv_heads"] == info["heads"] == 32 and info["head_dim"] == 128
    assert info["bytes_per_param"] == 2  # no dtype in the config: assume half precision
    assert info["weights_bytes"] == 2 * info["params"]


def test_bytes_per_param_follows_the_config_dtype():
    assert modelinfo.config_dtype_bytes(llama(dtype="float32")) == 4
    assert modelinfo.config_dtype_bytes(llama(dtype="bfloat16")) == 2
    assert modelinfo.config_dtype_bytes(llama(torch_dtype="float16")) == 2
    assert modelinfo.config_dtype_bytes(llama()) == 2


def test_tied_embeddings_count_once():
    import torch
    from transformers import AutoModelForCausalLM

    config = llama(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=2, vocab_size=100, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    real = AutoModelForCausalLM.from_config(config)
    info = modelinfo.model_info(config)
    assert info["params"] == sum(p.numel() for p in real.parameters())
    untied = modelinfo.model_info(llama(**{**config.to_dict(), "tie_word_embeddings": False}))
    assert untied["params"] - info["params"] == 100 * 32


def test_a_70b_config_is_fast_and_allocates_no_weights():
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    began = time.perf_counter()
    info = modelinfo.model_info(llama(**LLAMA3_70B))
    seconds = time.perf_counter() - began
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert info["params"] == 70_553_706_496  # Llama-3-70B
    assert info["weights_bytes"] > 140e9
    assert seconds < 10, seconds
    assert grown_mib < 200, grown_mib  # 140 GB of weights never materialised


def test_inference_memory_is_weights_plus_kv_cache():
    info = modelinfo.model_info(llama(**LLAMA2_7B))
    weights = info["params"] * 2
    # K and V x 32 layers x 32 kv heads x 128 dims x 2 bytes per token: 512 KiB a token
    per_token = 2 * 32 * 32 * 128 * 2
    assert per_token == 512 * 1024
    assert modelinfo.inference_memory_bytes(info, 2) == weights + per_token * 2048
    assert modelinfo.inference_memory_bytes(info, 2, batch=4, seq=1024) == (
        weights + per_token * 4 * 1024
    )
    assert modelinfo.inference_memory_bytes(info, 4, seq=0) == info["params"] * 4
    # Grouped-query attention: 8 kv heads for 64 query heads keep an eighth of the cache.
    big = modelinfo.model_info(llama(**LLAMA3_70B))
    assert modelinfo.kv_cache_bytes(big, 2, seq=1) == 2 * 80 * 8 * 128 * 2
