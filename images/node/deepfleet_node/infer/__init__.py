"""Batch text generation with a HF causal LM (`python -m deepfleet_node.infer`): one
process, replicas, tensor or ZeRO-3 parallel. See cli.py for the modes.

  cli          arguments, the run, main
  prompts      reading prompts, writing and showing result rows
  text         prompt encoding (chat template) and stop strings, shared with serve
  loading      the dtype, the device, the model per mode (replicas, tp, zero)
  generate     generation per mode, and the plain transformers reference
  distributed  the process group, the shared prompt queue, gathering rows

Import-light: nothing here imports torch or DeepSpeed at import time.
"""
