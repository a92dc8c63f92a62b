"""Checkpoints on shared or node-local disks: save, the latest tag, resume, and the
final HF-format export. The engine is DeepSpeed's or the bridge's (the same API)."""

from __future__ import annotations

import secrets
from pathlib import Path

from .._log import say


def output_is_shared(out: Path, rank: int, device) -> bool:
    """Whether every rank sees rank 0's output dir, i.e. one filesystem for all nodes.

    deepfleet nodes normally each have their own disk; then DeepSpeed must write the
    per-node parts of a checkpoint on every node (use_node_local_storage).
    """
    import torch
    import torch.distributed as dist

    token = [secrets.token_hex(8) if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    marker = out / f".deepfleet-shared-{token[0]}"
    if rank == 0:
        marker.touch()
    dist.barrier()
    seen = torch.tensor([int(marker.exists())], device=device)
    dist.all_reduce(seen, op=dist.ReduceOp.MIN)
    if rank == 0:
        marker.unlink()
    return bool(seen.item())


def save_checkpoint(engine, ckpt_dir: Path, step: int) -> None:
    # Every rank writes its own ZeRO shard; DeepSpeed writes ckpt_dir/latest on rank 0.
    tag = f"global_step{step}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step})
    if engine.use_node_local_storage() and engine.local_rank == 0:
        # ...so on node-local disks the other nodes need their own pointer.
        (ckpt_dir / "latest").write_text(tag)


def latest_tag(ckpt_dir: Path) -> str | None:
    """Rank 0's view of the newest checkpoint, shared so every rank makes one decision."""
    import torch.distributed as dist

    latest = ckpt_dir / "latest"
    tag = [latest.read_text().strip() if latest.is_file() else None]
    dist.broadcast_object_list(tag, src=0)
    return tag[0]


def resume(engine, ckpt_dir: Path) -> int:
    tag = latest_tag(ckpt_dir)
    if tag is None:
        say(f"no checkpoint in {ckpt_dir}; starting from step 0")
        return 0
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {ckpt_dir}")
    step = int(client_state["step"])
    say(f"resumed from step {step}")
    return step


def export_final(engine, tokenizer, final_dir: Path, rank: int) -> None:
    """HF-format model + tokenizer, written by global rank 0 only.

    Under ZeRO-3 each rank holds a slice of every weight, so all ranks take part in the
    gather and rank 0 receives the full state dict; under stages 0-2 rank 0's module
    already holds full, updated weights.
    """
    import torch.distributed as dist

    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if rank == 0 else None
    if rank == 0:
        model = engine.module
        model.config.use_cache = True
        model.save_pretrained(final_dir, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(final_dir)
    dist.barrier()
