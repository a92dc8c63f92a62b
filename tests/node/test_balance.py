"""Uneven micro-batches per rank: the shares, the loss weighting that keeps every
optimizer step the token mean over the global batch, and train end to end.

Also run as a script (`python test_balance.py grad-worker ...`): one rank of the
two-process gradient test.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest
from nodetools import require

torch = require("torch")
require("transformers")

from nodetools import (  # noqa: E402
    SUBPROCESS_TIMEOUT_S,
    free_port,
    node_env,
    pair_args,
    read_jsonl,
    run_ranks,
)

from deepfleet_node.train import balance  # noqa: E402

# ---------------------------------------------------------------- shares


@pytest.mark.parametrize(
    "speeds,total,expected",
    [
        ([1.0, 1.0], 8, [4, 4]),
        ([3.0, 1.0], 8, [6, 2]),
        ([2.0, 1.0, 1.0], 12, [6, 3, 3]),
        ([1.0, 0.52, 0.31], 12, [7, 3, 2]),  # quotas 6.56/3.41/2.03
        ([1.0, 1.0, 1.0], 4, [2, 1, 1]),  # a tie: the lower rank takes the spare sample
        ([1.0, 1.0, 1.0], 5, [2, 2, 1]),
        ([1.0, 1e-6], 8, [7, 1]),  # a crawling rank still takes one
        ([1e-6, 1.0, 1e-6], 3, [1, 1, 1]),
        ([5.0], 4, [4]),
    ],
)
def test_shares_from_speeds(speeds, total, expected):
    assert balance.shares_from_speeds(speeds, total) == expected


@pytest.mark.parametrize("seed", range(40))
def test_shares_give_the_shortest_micro_step_and_follow_speed(seed):
    gen = torch.Generator().manual_seed(seed)
    world = int(torch.randint(1, 5, (1,), generator=gen))
    total = world + int(torch.randint(0, 14, (1,), generator=gen))
    speeds = (torch.rand(world, generator=gen) * 10 + 0.01).tolist()
    shares = balance.shares_from_speeds(speeds, total)
    assert sum(shares) == total and min(shares) >= 1
    seconds = [1 / s for s in speeds]
    # No split of total samples (each rank at least one) has a shorter slowest rank.
    best = min(
        balance.predicted_time(split, seconds)
        for split in itertools.product(range(1, total + 1), repeat=world)
        if sum(split) == total
    )
    assert balance.predicted_time(shares, seconds) == pytest.approx(best)
    # Faster never gets fewer samples.
    by_speed = sorted(range(world), key=lambda i: speeds[i])
    assert [shares[i] for i in by_speed] == sorted(shares)


def test_the_spare_sample_goes_where_it_shortens_the_step():
    # quotas 12.4/7.1/4.6: largest remainder gives lab3 the spare (12/7/5, 2.45 s per
    # micro-step at 2.04 samples/s); the shortest step gives it to the fastest rank
    assert balance.shares_from_speeds([5.5, 3.23, 2.04], 24) == [13, 7, 4]


def test_shares_are_proportional_and_scale_free():
    assert balance.shares_from_speeds([0.5, 0.25, 0.25], 16) == [8, 4, 4]
    assert balance.shares_from_speeds([50, 25, 25], 16) == [8, 4, 4]


@pytest.mark.parametrize("speeds,total", [([1.0, 1.0, 1.0], 2), ([], 4), ([1.0, 0.0], 4),
                                          ([1.0, float("nan")], 4), ([1.0, -1.0], 4)])  # fmt: skip
def test_impossible_shares_are_errors(speeds, total):
    with pytest.raises(ValueError):
        balance.shares_from_speeds(speeds, total)


def test_rebalancing_needs_a_clear_gain():
    seconds = [1.0, 2.0]  # rank 1 takes twice as long per sample
    assert balance.predicted_time([4, 4], seconds) == 8.0
    assert balance.predicted_time([5, 3], seconds) == 6.0
    assert balance.worth_rebalancing([4, 4], [5, 3], seconds)
    assert not balance.worth_rebalancing([5, 3], [5, 3], seconds)
    # 5.2 -> 5.0 is under 4% faster: not worth a new split; 5.0 -> 5.2 is slower.
    assert not balance.worth_rebalancing([4, 4], [5, 3], [1.0, 1.3])
    assert not balance.worth_rebalancing([5, 3], [4, 4], [1.0, 1.3])


def test_shares_arguments_and_the_balance_line():
    assert balance.parse_shares("6,3,3") == [6, 3, 3]
    for bad in ("6,x", "6,0", "", "6,-1"):
        with pytest.raises(ValueError):
            balance.parse_shares(bad)
    balance.check_shares([6, 3, 3], 3, 12)
    with pytest.raises(ValueError, match="sum to 11"):
        balance.check_shares([6, 3, 2], 3, 12)
    with pytest.raises(ValueError, match="for 2 ranks"):
        balance.check_shares([6, 3, 3], 2, 12)
    line = balance.describe([6, 3, 3], [2.0, 1.04, 0.62], "from calibration")
    assert line == (
        "balance: micro-batch per rank 6/3/3 (relative speed 1.00/0.52/0.31, from calibration)"
    )


# ---------------------------------------------------------------- the loss weighting


def masked_blocks(model_dir, train_text, n=8, seq_len=32):
    """n packed blocks with very unlike numbers of labelled tokens (one with none)."""
    from transformers import AutoTokenizer

    from deepfleet_node import data

    tok = AutoTokenizer.from_pretrained(model_dir)
    packed = data.build_packed(tok, [{"text": Path(train_text).read_text()}], seq_len)
    labels = packed.labels[:n].clone()
    for i, masked in enumerate([0, 30, 5, 32, 12, 27, 1, 20][:n]):
        labels[i, :masked] = data.IGNORE_INDEX
    return data.PackedDataset(packed.input_ids[:n], labels, packed.attention_mask[:n])


def flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def test_token_loss_sum_is_hf_loss_times_targets(tiny_model, train_text):
    from transformers import AutoModelForCausalLM

    from deepfleet_node.train import loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    blocks = masked_blocks(tiny_model, train_text)
    with torch.no_grad():
        for rows in ([0, 1, 2], [1, 5], [4]):
            ids, labels = blocks.input_ids[rows], blocks.labels[rows]
            out = model(input_ids=ids, labels=labels)
            ours = loss.token_loss_sum(out.logits, labels)
            assert loss.valid_targets(labels) == int((labels[:, 1:] != -100).sum())
            assert ours.item() == pytest.approx(out.loss.item() * loss.valid_targets(labels), 1e-6)
        # A block with no valid target: HF's mean is 0/0, the sum is a plain 0.
        lone = blocks.labels[[3]]
        assert loss.valid_targets(lone) == 0
        assert torch.isnan(model(input_ids=blocks.input_ids[[3]], labels=lone).loss)
        assert loss.token_loss_sum(model(input_ids=blocks.input_ids[[3]]).logits, lone) == 0


def test_the_zero3_probe_times_this_rank(tiny_model):
    from transformers import AutoConfig

    from deepfleet_node.train import speed

    config = AutoConfig.from_pretrained(tiny_model)
    seconds = speed.probe_seconds(config, torch.float32, torch.device("cpu"))
    assert 0 < seconds < 1


# (shares, micro-batch, grad-accum): every case trains on the same 8 blocks per step.
GRAD_CASES = {
    "6:2": ([6, 2], 4, 1),
    "4:4": ([4, 4], 4, 1),
    "3:1 x2": ([3, 1], 2, 2),
    "2:2 x2": ([2, 2], 2, 2),
}


def grad_worker(model_dir: str, blocks_path: str, out_path: str) -> None:
    """One of two gloo ranks: each case's gradient as DeepSpeed would form it (the loss
    divided by grad-accum, then the mean over ranks), plus a per-rank-mean control."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from deepfleet_node import data
    from deepfleet_node.train.loss import (
        all_reduce_sum,
        token_loss_sum,
        valid_targets,
        weighted_loss,
    )
    from deepfleet_node.train.model import model_inputs

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    blocks = data.PackedDataset(**torch.load(blocks_path))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cpu = torch.device("cpu")
    grads = {}
    for name, (shares, micro, ga) in GRAD_CASES.items():
        for control in (False, True) if name == "6:2" else (False,):
            stream = data.BatchStream(blocks, rank, world, micro, seed=1, shares=shares)
            model.zero_grad(set_to_none=True)
            batches = [stream.batch(m) for m in range(ga)]
            targets = [valid_targets(b["labels"]) for b in batches]
            step_targets = all_reduce_sum(sum(targets), cpu)
            for batch, count in zip(batches, targets, strict=True):
                loss_sum = token_loss_sum(model(**model_inputs(batch, cpu)).logits, batch["labels"])
                if control:  # what the old code did: each rank's own token mean
                    loss = loss_sum / max(count, 1)
                else:
                    loss = weighted_loss(loss_sum, world, ga, step_targets)
                (loss / ga).backward()  # DeepSpeed's engine.backward scaling
            flat = flat_grad(model).detach().clone()
            dist.all_reduce(flat)
            grads[name + (" per-rank mean" if control else "")] = flat / world
    if rank == 0:
        torch.save(grads, out_path)
    dist.barrier()
    dist.destroy_process_group()


def test_uneven_splits_give_the_token_mean_gradient(tmp_path, tiny_model, train_text):
    from transformers import AutoModelForCausalLM

    blocks = masked_blocks(tiny_model, train_text)
    torch.save(vars(blocks), tmp_path / "blocks.pt")
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "grad-worker",
                str(tiny_model),
                str(tmp_path / "blocks.pt"),
                str(tmp_path / "grads.pt"),
            ],
            env=node_env(rank, 2, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in range(2)
    ]
    # One process's token mean over all 8 blocks, HF's own loss.
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model(input_ids=blocks.input_ids, labels=blocks.labels).loss.backward()
    reference = flat_grad(model)
    for proc in procs:
        out = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)[0]
        assert proc.returncode == 0, out[-6000:]
    grads = torch.load(tmp_path / "grads.pt")

    scale = reference.abs().max().item()
    diffs = {name: (g - reference).abs().max().item() for name, g in grads.items()}
    print(f"max |grad| {scale:.3e}; max abs difference from one process: {diffs}")
    for name in GRAD_CASES:
        assert diffs[name] < 1e-6 * max(scale, 1), diffs
    assert (grads["6:2"] - grads["4:4"]).abs().max() < 1e-6 * max(scale, 1)
    assert (grads["3:1 x2"] - grads["2:2 x2"]).abs().max() < 1e-6 * max(scale, 1)
    # The test can tell: averaging each rank's own mean is visibly another gradient.
    assert diffs["6:2 per-rank mean"] > 1e-3 * scale, diffs


# ---------------------------------------------------------------- train end to end


def losses(out):
    return [r["loss"] for r in read_jsonl(Path(out) / "metrics.jsonl")]


def test_uneven_shares_train_like_an_even_split(tmp_path, tiny_model, mixed_data, even_pair_run):
    even_out, even_logs = even_pair_run
    out = tmp_path / "run"
    logs = run_ranks("train", 2, *pair_args(tiny_model, mixed_data, out), "--shares", "3,1")
    assert "balance: micro-batch per rank 3/1 (from --shares)" in logs[0]
    assert "balance: micro-batch per rank 2/2 (from --shares)" in even_logs[0]
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["micro_batches"] for r in rows] == [[3, 1]] * 5
    assert all(r["samples_per_s"] > 0 for r in rows)
    print("3:1 vs 2:2 losses:", list(zip(losses(out), losses(even_out), strict=True)))
    assert losses(out) == pytest.approx(losses(even_out), rel=1e-4)
    assert losses(out)[-1] < losses(out)[0] - 0.05  # three updates moved the weights


BALANCE_LINE = re.compile(
    r"^balance: micro-batch per rank (\d+)/(\d+) \(relative speed ([\d.]+)/([\d.]+), "
    r"from (calibration|the forward (?:and backward )?passes of steps 1-2)"
    r"(; kept: no split 5% faster)?\)$",
    re.M,
)


def test_speed_balancing_measures_and_trains_alike(tmp_path, tiny_model, mixed_data, even_pair_run):
    out = tmp_path / "run"
    args = pair_args(tiny_model, mixed_data, out)
    logs = run_ranks("train", 2, *args, "--balance", "speed", "--rebalance-after", "2")
    lines = BALANCE_LINE.findall(logs[0])
    assert lines and lines[0][4] == "calibration", logs[0]
    # then the rebalance: from the forward timings, or the calibration kept when the tiny
    # model's two steps hold under a second of forward passes (bursts, not sustained speed)
    later = [x for x in logs[0].splitlines() if x.startswith("balance:")][1:]
    assert len(later) == 1 and "steps 1-2" in later[0], logs[0]
    if "kept: steps 1-2 held" in later[0]:
        assert re.search(r"held [\d.]+ s of forward (and backward )?passes, under 1 s\)$", later[0])
    for first, second, *speeds, _, _ in lines:
        assert int(first) + int(second) == 4
        assert max(float(s) for s in speeds) == 1.0
    start = [int(lines[0][0]), int(lines[0][1])]
    rows = read_jsonl(out / "metrics.jsonl")
    assert rows[0]["micro_batches"] == start
    assert all(sum(r["micro_batches"]) == 4 for r in rows)
    assert not BALANCE_LINE.search(logs[1])  # rank 0 reports
    # Whatever the split, the job trains on the same samples with the same weights.
    assert losses(out) == pytest.approx(losses(even_pair_run[0]), rel=1e-4)


def test_shares_that_do_not_fit_are_refused(tmp_path, tiny_model, mixed_data):
    from nodetools import run_module

    with pytest.raises(AssertionError, match="--shares: shares 3 sum to 3, not the global"):
        run_module("train", *pair_args(tiny_model, mixed_data, tmp_path), "--shares", "3")


if __name__ == "__main__" and sys.argv[1:2] == ["grad-worker"]:
    grad_worker(*sys.argv[2:])


def test_caps_hold_a_fast_rank_to_what_its_memory_holds():
    # 8:1:1 speeds over 20 samples: the fast rank's quota is 16, its cap 10
    assert balance.shares_from_speeds([8, 1, 1], 20, [10, 20, 20]) == [10, 5, 5]
    assert balance.shares_from_speeds([8, 1, 1], 20) == [16, 2, 2]
    # caps that hold exactly the total leave no choice
    assert balance.shares_from_speeds([1, 1, 1], 9, [2, 3, 4]) == [2, 3, 4]
    for speeds, total, caps in [([3, 2, 1], 12, [5, 5, 5]), ([1, 5, 1, 1], 11, [9, 3, 9, 2])]:
        shares = balance.shares_from_speeds(speeds, total, caps)
        assert sum(shares) == total and all(1 <= s <= c for s, c in zip(shares, caps, strict=True))
    with pytest.raises(ValueError, match="hold fewer than 10"):
        balance.shares_from_speeds([1, 1], 10, [4, 5])


def test_what_the_rebalance_times_holds_no_collective():
    from types import SimpleNamespace

    from deepfleet_node.train.speed import make_balancer

    args = SimpleNamespace(balance="speed", shares=None, rebalance_after=3)
    zero1 = make_balancer(args, world=3, stage=1, start=0, total=8, ga=2)
    # ZeRO-1 reduces at the boundary: the micro-step before it, backward included
    assert zero1.with_backward and zero1.timed_what() == "forward and backward passes"
    assert [zero1.times(0, m, 2) for m in range(2)] == [True, False]
    assert not zero1.times(3, 0, 2)  # past the rebalance
    zero2 = make_balancer(args, world=3, stage=2, start=0, total=8, ga=2)
    # ZeRO-2 reduces inside every backward: the forward alone, every micro-step
    assert not zero2.with_backward and [zero2.times(0, m, 2) for m in range(2)] == [True, True]
    one = make_balancer(args, world=3, stage=1, start=0, total=8, ga=1)
    assert not one.with_backward  # no micro-step without the reduction
