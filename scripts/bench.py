"""make bench: every figure as a ratio measured side by side in one run.

One 3-machine lab, its links capped at LINK (tc, docker/lab.py) for the transfer figures
and uncapped for the jobs, then the same machines at CPU quotas 0.9/0.5/0.3 for the
balance figures (scripts/bench_unlike.py), and `deepfleet serve` against `make infer`
(scripts/bench_serve.py). Writes bench/results/bench-<time>.json and
prints a table with each goal beside its figure. Nothing here is a test: a goal missed
is a figure, not a failure.

    .venv/bin/python scripts/bench.py [--image deepfleet/cuda:latest] [--skip-unlike]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docker"))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_serve  # noqa: E402
import bench_unlike  # noqa: E402
import lab  # noqa: E402

DF = str(ROOT / ".venv" / "bin" / "deepfleet")
NATIVE = ROOT / ".bench-native"
LOGS = ROOT / ".bench-logs"
LAB_DIR = ROOT / ".lab"
LINK = "200mbit"
MACHINES = ("lab1", "lab2", "lab3")
TRAIN_STEPS = 40
# enough generation (about 4,000 tokens) that its own start-up does not set the rate
PROMPTS = [f"{w} the lighthouse keeper" for w in ("The", "A", "Then", "Later")] * 16
MAX_NEW = 64

# key: (comparison, goal); None: a figure without a goal
GOALS = {
    "up_present_ratio": ("<=", 1.3),
    "fanout_ratio": ("<=", 1.5),
    "operator_upload_ratio": ("<=", 1.1),
    "reup_bytes": ("==", 0),
    "vs_naive_ratio": ("<=", 1.0),
    "container_vs_native": (">=", 0.95),
    "first_step_s": ("<", 30),
    "infer_vs_generate": (">=", 1.6),
    "infer_launch_s": None,
    "serve_tokens_per_s": None,
    "infer_wall_tokens_per_s": None,
    "serve_vs_infer": (">=", 1.0),
    "ttft_s": None,
    "ttft_loaded_s": None,
    "balance_ratio": (">=", 0.9),
    "equal_split_ratio": None,
}

STREAMED = re.compile(r"\[(\S+)\] image streamed (\d+) MB in ([\d.]+)s")
RELAYED = re.compile(r"\[(\S+)\] image relayed (\d+) MB in ([\d.]+)s")
SENT = re.compile(r"images: (\d+) MB sent from here")
STEP = re.compile(r"step (\d+)/\d+ loss [\d.]+ .*?tok/s (\d+)")
GENERATED = re.compile(r"generated (\d+) tokens in ([\d.]+)s \(([\d.]+) tok/s")


class BenchError(Exception):
    pass


def log_path(name: str) -> Path:
    return LOGS / f"{name}.log"


def deepfleet(*args: str, log: str, env=None) -> tuple[str, float]:
    """Run the CLI; its output is kept with each line's seconds since the start."""
    began = time.monotonic()
    proc = subprocess.Popen(
        [DF, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    lines, stamped = [], []
    for line in proc.stdout:
        lines.append(line)
        stamped.append(f"[+{time.monotonic() - began:6.1f}s] {line}")
    code = proc.wait()
    seconds = time.monotonic() - began
    output = "".join(lines)
    log_path(log).write_text("".join(stamped))
    if code != 0:
        raise BenchError(
            f"deepfleet {' '.join(args)} failed (.bench-logs/{log}.log):\n{output[-2000:]}"
        )
    return output, seconds


def up(*machines: str, log: str, image: str) -> tuple[str, float]:
    return deepfleet(
        "up", "--ssh-config", str(LAB_DIR / "ssh_config"),
        "--compose-override", str(LAB_DIR / "compose.override.yml"),
        "--image", image, *machines, log=log,
    )  # fmt: skip


def down() -> None:
    subprocess.run([DF, "down"], capture_output=True, cwd=ROOT)


def forget_image(machine: str, image: str) -> None:
    """Make a lab machine fresh again: its engine without the node image's layers."""
    index = machine.removeprefix("lab")
    container = f"{lab.PREFIX}-{index}"
    subprocess.run(["docker", "exec", container, "docker", "rmi", "-f", image], capture_output=True)
    subprocess.run(
        ["docker", "exec", container, "docker", "image", "prune", "-af"], capture_output=True
    )


def naive_copy(machine: str, image: str) -> float:
    """`docker save | ssh docker load`: what one would do by hand."""
    began = time.monotonic()
    save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
    load = subprocess.run(
        ["ssh", "-F", str(LAB_DIR / "ssh_config"), machine, "docker", "load"],
        stdin=save.stdout, capture_output=True, text=True,
    )  # fmt: skip
    save.stdout.close()
    if save.wait() != 0 or load.returncode != 0:
        raise BenchError(f"naive copy to {machine} failed: {load.stderr[-500:]}")
    return time.monotonic() - began


def transfers(image: str) -> dict:
    """Fan-out, re-up and naive-copy figures, on capped links."""
    client = lab.docker.from_env(timeout=600)
    lab.shape_links(client, LINK)
    try:
        out, _ = up("lab1", log="up-1-fresh", image=image)
        (_, size_mb, one_s), *_ = ((m, int(mb), float(s)) for m, mb, s in STREAMED.findall(out))
        down()
        naive_s = naive_copy("lab2", image)
        for machine in ("lab1", "lab2"):
            forget_image(machine, image)
        out, _ = up(*MACHINES, log="up-3-fresh", image=image)
        relayed = [(m, int(mb), float(s)) for m, mb, s in RELAYED.findall(out)]
        streamed = [(m, int(mb), float(s)) for m, mb, s in STREAMED.findall(out)]
        three_s = max(s for _, _, s in relayed + streamed)
        sent_mb = int(SENT.search(out).group(1)) if SENT.search(out) else 0
        down()
        out, up3_s = up(*MACHINES, log="up-3-present", image=image)
        reup = SENT.search(out)
        down()
        _, up1_s = up("lab1", log="up-1-present", image=image)
        down()
    finally:
        lab.unshape_links(client)
    return {
        "link": LINK,
        "image_MB": size_mb,
        "stream_1_fresh_s": one_s,
        "naive_1_fresh_s": round(naive_s, 1),
        "vs_naive_ratio": round(one_s / naive_s, 3),
        "image_3_fresh_s": three_s,
        "image_3_fresh_routes": {m: "relayed" for m, _, _ in relayed}
        | {m: "streamed" for m, _, _ in streamed},
        "fanout_ratio": round(three_s / one_s, 3),
        "operator_sent_3_fresh_MB": sent_mb,
        "operator_upload_ratio": round(sent_mb / size_mb, 3),
        "reup_bytes": int(reup.group(1)) * 10**6 if reup else 0,
        "up_3_present_s": round(up3_s, 1),
        "up_1_present_s": round(up1_s, 1),
        "up_present_ratio": round(up3_s / up1_s, 3),
    }


def steady_tokens_per_s(output: str, steps: int) -> float:
    rows = [(int(s), float(t)) for s, t in STEP.findall(output)]
    steady = [t for s, t in rows if s > steps // 2]
    if not steady:
        raise BenchError("no step lines in a training run's output")
    return statistics.median(steady)


def native_train(steps: int) -> float:
    """The same train module under plain `deepspeed`, 2 CPU processes on this machine."""
    subprocess.run([str(ROOT / "scripts" / "bench-native.sh")], check=True)
    work = ROOT / ".bench-native" / "work"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "images" / "node"),
        "PATH": f"{NATIVE / 'bin'}:{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",  # what the plan gives 2 ranks on a 2-core machine
        "DEEPFLEET_BACKEND": "gloo",
        "PYTHONUNBUFFERED": "1",
    }
    py = str(NATIVE / "bin" / "python")
    subprocess.run(
        [py, "-m", "deepfleet_node.tiny", "--out", str(work / "model"),
         "--data-out", str(work / "data" / "train.txt")],
        check=True, capture_output=True, env=env,
    )  # fmt: skip
    # no hostfile: DeepSpeed then runs the ranks here itself, without ssh
    proc = subprocess.run(
        [str(NATIVE / "bin" / "deepspeed"), "--num_gpus", "2",
         "--master_addr", "127.0.0.1", "--master_port", "29533",
         "--module", "deepfleet_node.train",
         "--model", str(work / "model"), "--data", str(work / "data" / "train.txt"),
         "--deepspeed-config", "zero2", "--output", str(work / "run"),
         "--steps", str(steps), "--seq-len", "64", "--micro-batch", "4", "--lr", "0.003",
         "--log-every", "5", "--precision", "fp32", "--balance", "even"],
        capture_output=True, text=True, env=env, cwd=work,
    )  # fmt: skip
    log_path("train-native").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise BenchError(f"native deepspeed run failed:\n{(proc.stdout + proc.stderr)[-2000:]}")
    return steady_tokens_per_s(proc.stdout, steps)


def one_process_generate(model_dir: Path) -> float:
    """HF generate in one process on the same prompts (infer's own reference)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "images" / "node"), "OMP_NUM_THREADS": "2"}
    code = (
        "import json, sys, time\n"
        "from deepfleet_node.infer.generate import reference_generate\n"
        "prompts = json.loads(sys.argv[2])\n"
        "reference_generate(sys.argv[1], prompts[:1], 4)\n"  # warm-up, as infer's load is
        "began = time.perf_counter()\n"
        "rows = reference_generate(sys.argv[1], prompts, int(sys.argv[3]))\n"
        "seconds = time.perf_counter() - began\n"
        "print(sum(r['tokens'] for r in rows) / seconds)\n"
    )
    proc = subprocess.run(
        [str(NATIVE / "bin" / "python"), "-c", code, str(model_dir), json.dumps(PROMPTS),
         str(MAX_NEW)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    if proc.returncode != 0:
        raise BenchError(f"one-process generate failed:\n{proc.stderr[-2000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def jobs(image: str) -> dict:
    """First step, container vs native, infer vs generate: 2 machines, uncapped links."""
    up("lab1", "lab2", log="up-jobs", image=image)
    try:
        deepfleet("train", "--run", "warm", "--steps", "2", "--log-every", "1", log="train-warm")
        began = time.monotonic()
        proc = subprocess.Popen(
            [DF, "train", "--run", "first", "--steps", "5", "--log-every", "1"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        first_step = None
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if first_step is None and re.search(r"\] step 1/", line):
                first_step = time.monotonic() - began
        proc.wait()
        log_path("train-first-step").write_text("".join(seen))
        out, _ = deepfleet(
            "train", "--run", "lab2ranks", "--slots", "lab1=2", "--slots", "lab2=0",
            "--steps", str(TRAIN_STEPS), "--log-every", "5", "--micro-batch", "4",
            log="train-container",
        )  # fmt: skip
        container_tps = steady_tokens_per_s(out, TRAIN_STEPS)
        try:
            native_tps = native_train(TRAIN_STEPS)
        except (BenchError, subprocess.CalledProcessError) as exc:
            print(f"bench: native: {exc}", file=sys.stderr)
            native_tps = None
        prompts = LOGS / "prompts.txt"
        prompts.write_text("\n".join(PROMPTS) + "\n")
        # Two lab machines share this machine's cores: each would see them all and run
        # a 2-thread OpenMP pool, and two such pools on 2 cores spin against each other
        # (95 tok/s each, against 630-1000 with one thread). A 1-core quota makes each a
        # 1-core machine, as two real machines would not share: infer sizes its pool by
        # it. The one-process reference keeps both cores.
        for index in (1, 2):
            lab.set_limits(index, 1.0, None)
        try:
            out, infer_s = deepfleet(
                "infer", "--run", "lab2ranks", "--prompts", str(prompts),
                "--max-new-tokens", str(MAX_NEW), log="infer",
            )  # fmt: skip
        finally:
            for index in (1, 2):
                lab.set_limits(index, None, None)
        tokens, gen_s, infer_tps = GENERATED.search(out).groups()
        model = LOGS / "export"
        shutil.rmtree(model, ignore_errors=True)  # fetch-model keeps what is there
        deepfleet("fetch-model", "--run", "lab2ranks", "--dest", str(model), log="fetch")
        generate_tps = one_process_generate(model)
    finally:
        down()
    return {
        "first_step_s": round(first_step, 1) if first_step else None,
        "train_container_tokens_per_s": container_tps,
        "train_native_tokens_per_s": native_tps,
        "container_vs_native": round(container_tps / native_tps, 3) if native_tps else None,
        "infer_tokens_per_s (2 replicas)": float(infer_tps),
        "generate_tokens_per_s (one process)": round(generate_tps, 1),
        "infer_vs_generate": round(float(infer_tps) / generate_tps, 3),
        "infer_launch_s": round(infer_s - float(gen_s), 1),
        "infer_tokens": int(tokens),
    }


def serving(image: str) -> dict:
    """deepfleet serve against make infer: 2 machines at one core each."""
    up("lab1", "lab2", log="up-serve", image=image)
    try:
        return bench_serve.measure(deepfleet, DF, ROOT, LOGS, lab.set_limits)
    finally:
        down()


def verdict(key: str, value) -> str:
    goal = GOALS.get(key)
    if goal is None or value is None:
        return ""
    op, target = goal
    ok = {"<=": value <= target, ">=": value >= target, "<": value < target,
          "==": value == target}[op]  # fmt: skip
    return f"goal {op} {target}: {'met' if ok else 'NOT met'}"


def table(result: dict) -> str:
    rows = [f"{'figure':28} {'value':>12}  goal"]
    for key in GOALS:
        value = result.get(key)
        shown = "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
        rows.append(f"{key:28} {shown:>12}  {verdict(key, value)}")
    return "\n".join(rows)


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=ROOT)  # fmt: skip
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                           cwd=ROOT).stdout.strip()  # fmt: skip
    return done.stdout.strip() + ("+changes" if dirty else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="deepfleet/cpu:latest")
    parser.add_argument("--skip-unlike", action="store_true")
    parser.add_argument("--only", choices=("transfers", "jobs", "serve", "unlike"), help="one part")
    args = parser.parse_args(argv)
    LOGS.mkdir(exist_ok=True)
    os.environ.setdefault("DEEPFLEET_STATE_DIR", str(ROOT / ".bench-state"))
    began = time.monotonic()
    size = lab.docker.from_env().images.get(args.image).attrs["Size"]
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "commit": commit(),
        "image": args.image,
        "image_size_MB": round(size / 1e6),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.node()}",
    }
    lab.down(lab_dir=LAB_DIR)
    parts = [("transfers", lambda: transfers(args.image)), ("jobs", lambda: jobs(args.image)),
             ("serve", lambda: serving(args.image))]  # fmt: skip
    if not args.skip_unlike:
        parts.append(("unlike", lambda: bench_unlike.measure(MACHINES, LAB_DIR, args.image)))
    parts = [(n, f) for n, f in parts if args.only in (None, n)]
    try:
        lab.up(len(MACHINES), LAB_DIR)
        for name, part in parts:  # a part that fails leaves the others' figures
            try:
                result.update(part())
            except (BenchError, RuntimeError, SystemExit, subprocess.CalledProcessError) as exc:
                print(f"bench: {name}: {exc}", file=sys.stderr)
                result.setdefault("errors", {})[name] = str(exc).splitlines()[0]
                down()
    finally:
        down()
        lab.down(lab_dir=LAB_DIR)
    result["bench_s"] = round(time.monotonic() - began, 1)
    out = ROOT / "bench" / "results" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(table(result))
    print(f"bench: saved {out.relative_to(ROOT)} ({result['bench_s']:.0f} s)")
    return 1 if "errors" in result else 0


if __name__ == "__main__":
    sys.exit(main())
