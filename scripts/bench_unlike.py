"""make bench, unlike machines: speed-balanced micro-batches against an even split.

Three lab machines at CPU quotas 0.9, 0.5 and 0.3 cores (their sum stays under this
machine's two cores). Each trains alone first (its solo tokens/s), then all three train
together with an even split and with the speed-balanced split, side by side in one run:

    balance_ratio      balanced tokens/s / sum of the solo tokens/s   (goal >= 0.9)
    equal_split_ratio  even-split tokens/s / sum of the solo tokens/s

and the two joint runs' loss curves, which must agree (same samples per optimizer step).
scripts/bench.py calls measure() on its lab; alone:
    python scripts/bench_unlike.py RESULT.json   (adds its keys to that JSON file)
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docker"))

import lab  # noqa: E402

CPUS = (0.9, 0.5, 0.3)
STEPS = 8
LOG_EVERY = 2
MICRO_BATCH = 16
GRAD_ACCUM = 2
SEQ_LEN = 256
# ZeRO-1 with 2 micro-steps per optimizer step: the gradients cross the network once per
# step, as a LAN job would be set up; ZeRO-2 reduces at every micro-step. A global
# micro-batch of 48 samples splits over the three speeds in steps of 2 % (24 split in 4 %).
CONFIG = "zero1"
# A 4.2M-parameter Llama: a micro-step takes 1-4 s on these quotas, so it spans many CFS
# periods and the quota (not a burst) sets each machine's speed, while its 17 MB
# all-reduce stays small beside the compute. The demo model's 20 ms steps measured
# per-step overhead instead of machine speed.
MODEL_SHAPE = ("--hidden-size", "256", "--intermediate-size", "1024", "--layers", "4")
DF = str(ROOT / ".venv" / "bin" / "deepfleet")
LOGS = ROOT / ".bench-logs"
STEP = re.compile(r"step (\d+)/\d+ loss ([\d.]+) .*?tok/s (\d+)")
SHARES = re.compile(r"balance: micro-batch per rank ([\d/]+)")


def deepfleet(*args: str, log: str) -> str:
    proc = subprocess.run([DF, *args], capture_output=True, text=True, cwd=ROOT)
    output = proc.stdout + proc.stderr
    (LOGS / log).write_text(output)
    if proc.returncode != 0:
        raise SystemExit(f"bench: deepfleet {' '.join(args)} failed:\n{output[-3000:]}")
    return output


def build_model(out: Path, image: str) -> Path:
    """The bench model, made here by the node image's own tiny builder (no hub)."""
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "-v", f"{out}:/out", image,
         "python", "-m", "deepfleet_node.tiny", "--out", "/out/model", *MODEL_SHAPE],
        check=True, capture_output=True,
    )  # fmt: skip
    return out / "model"


def train(run: str, slots: dict[str, int], balance: str, model: Path, world: int) -> dict:
    args = ["train", "--run", run, "--steps", str(STEPS), "--log-every", str(LOG_EVERY),
            "--micro-batch", str(MICRO_BATCH), "--seq-len", str(SEQ_LEN),
            "--global-batch", str(MICRO_BATCH * GRAD_ACCUM * world), "--config", CONFIG,
            "--model", str(model), "--balance", balance]  # fmt: skip
    for name, count in slots.items():
        args += ["--slots", f"{name}={count}"]
    output = deepfleet(*args, log=f"unlike-{run}.log")
    rows = [(int(s), float(loss), float(tok)) for s, loss, tok in STEP.findall(output)]
    if not rows:
        raise SystemExit(f"bench: no step lines in the {run} run (see .bench-logs)")
    # the first windows hold the start-up, the calibration and the rebalance
    steady = [tok for step, _, tok in rows if step > STEPS // 2]
    return {
        "tokens_per_s": statistics.median(steady),
        "losses": {step: loss for step, loss, _ in rows},
        "shares": SHARES.findall(output),
    }


def measure(machines, lab_dir: Path, image: str = "deepfleet/cpu:latest") -> dict:
    """On a running lab whose machines hold the image: quotas on, solo, even, balanced."""
    LOGS.mkdir(exist_ok=True)
    began = time.monotonic()
    model = build_model(LOGS / "unlike-model", image)
    for index, cpus in enumerate(CPUS, 1):
        lab.set_limits(index, cpus, None)
    try:
        deepfleet("up", "--ssh-config", str(lab_dir / "ssh_config"),
                  "--compose-override", str(lab_dir / "compose.override.yml"),
                  "--image", image, *machines, log="unlike-up.log")  # fmt: skip
        solo = {}
        for name in machines:
            alone = {other: 0 for other in machines if other != name}
            solo[name] = train(f"solo-{name}", alone, "even", model, 1)["tokens_per_s"]
        even = train("even", {}, "even", model, len(machines))
        balanced = train("balanced", {}, "speed", model, len(machines))
    finally:
        subprocess.run([DF, "down"], capture_output=True, cwd=ROOT)
        for index in range(1, len(CPUS) + 1):
            lab.set_limits(index, None, None)
    total = sum(solo.values())
    common = sorted(set(even["losses"]) & set(balanced["losses"]))
    loss_gap = max(
        abs(balanced["losses"][s] - even["losses"][s]) / even["losses"][s] for s in common
    )
    return {
        "unlike_cpu_quotas": list(CPUS),
        "unlike_setup": f"Llama 4.2M params (hidden 256, 4 layers), seq {SEQ_LEN}, fp32 CPU, "
        f"{CONFIG}, micro-batch {MICRO_BATCH} x {GRAD_ACCUM} micro-steps per optimizer step",
        "unlike_solo_tokens_per_s": solo,
        "unlike_even_tokens_per_s": even["tokens_per_s"],
        "unlike_balanced_tokens_per_s": balanced["tokens_per_s"],
        "unlike_balanced_shares": balanced["shares"],
        "balance_ratio": round(balanced["tokens_per_s"] / total, 3),
        "equal_split_ratio": round(even["tokens_per_s"] / total, 3),
        "balanced_vs_even_loss_max_rel_diff": round(loss_gap, 5),
        "unlike_bench_s": round(time.monotonic() - began, 1),
    }


def main(result_path: str) -> int:
    lab_dir = ROOT / ".lab"
    os.environ.setdefault("DEEPFLEET_STATE_DIR", str(ROOT / ".bench-state"))
    lab.up(3, lab_dir)
    try:
        figures = measure(("lab1", "lab2", "lab3"), lab_dir)
    finally:
        lab.down(lab_dir=lab_dir)
    path = Path(result_path)
    result = json.loads(path.read_text()) if path.is_file() else {}
    result.update(figures)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    print(f"bench: balance_ratio {figures['balance_ratio']} (goal >= 0.9), equal_split_ratio "
          f"{figures['equal_split_ratio']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/unlike.json"))
