"""The model, the dataset and the device a rank computes on."""

from __future__ import annotations

from ..zero3 import zero3_loading


def torch_device(device: str):
    """The torch.device of this rank's accelerator, or the CPU (device: its type)."""
    import torch
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name() if device != "cpu" else "cpu")


def load_model(args, ds_config: dict | None, precision: str):
    """The model, plus an object that must stay alive while ZeRO-3 is in use.

    With ZeRO-3 in ds_config (None: no DeepSpeed config, as in the bridge), zero3_loading
    makes from_pretrained build the model under deepspeed.zero.Init, so no rank ever holds
    the full weights.
    """
    from transformers import AutoModelForCausalLM

    from ..precision import torch_dtype

    keep_alive = None
    if ds_config is not None and ds_config["zero_optimization"].get("stage") == 3:
        keep_alive = zero3_loading(ds_config)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch_dtype(precision))
    # from_pretrained leaves the model in eval mode and DeepSpeed does not change it; in
    # eval mode HF skips activation checkpointing (and dropout) altogether.
    model.train()
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, keep_alive


def load_dataset(args, tokenizer):
    from .. import data

    if args.prepare_dataset:
        return data.from_hook(args.prepare_dataset, tokenizer, args.seq_len, args.data, args.seed)
    return data.build_packed(tokenizer, data.load_examples(args.data), args.seq_len)


def model_inputs(batch: dict, device) -> dict:
    """A batch's model inputs (no labels) on device."""
    return {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
