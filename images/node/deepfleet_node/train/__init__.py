"""DeepSpeed causal-LM fine-tuning (`python -m deepfleet_node.train`) and its bridge for
unlike devices (`python -m deepfleet_node.train.bridge`).

Import-light: nothing here imports torch or DeepSpeed at import time, so the operator can
import `deepfleet_node.train.balance` (pure arithmetic) without them.

  args         the command line, shared by train and the bridge
  config       the DeepSpeed config: batch sizes, optimizer, scheduler, ZeRO on CPU, precision
  model        model, tokenizer-side dataset, device
  loss         summed token losses and their weighting over the global batch
  balance      splitting the global micro-batch over unlike ranks (pure, no torch)
  speed        measuring each rank's speed: calibration, the ZeRO-3 probe, rebalancing
  metrics      the progress window, metrics.jsonl records, log lines, tensorboard
  checkpoints  save, resume, the latest tag, the final HF export
  loop         the training loop and main
  bridge       plain data parallelism over gloo for a world of unlike devices
"""
