#!/usr/bin/env bash
# make bench: time the whole path on a 2-machine simulated LAN, then speed balancing on 3
# unlike machines (scripts/bench_unlike.py), and save the figures.
# Figures are printed and written to bench/results/<time>.json; nothing here is a test.
# IMAGE=deepfleet/cuda:latest benches another node image on the same (GPU-less) machines.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEEPFLEET_STATE_DIR="$PWD/.bench-state"
out_dir=bench/results
mkdir -p "$out_dir" .bench-logs
cleanup() {
  status=$?
  .venv/bin/deepfleet down >/dev/null 2>&1 || true
  .venv/bin/python docker/lab.py down >/dev/null 2>&1 || true
  rm -rf "$DEEPFLEET_STATE_DIR"
  exit "$status"
}
trap cleanup EXIT INT TERM
now() { date +%s.%N; }
image="${IMAGE:-deepfleet/cpu:latest}"
[ -n "${IMAGE:-}" ] || make -s images >/dev/null
image_args=(--image "$image")
.venv/bin/python docker/lab.py down >/dev/null
t0=$(now); .venv/bin/python docker/lab.py up --nodes 2 >.bench-logs/lab.log; t1=$(now)
.venv/bin/deepfleet up --ssh-config .lab/ssh_config --compose-override .lab/compose.override.yml \
  "${image_args[@]}" lab1 lab2 >.bench-logs/up.log; t2=$(now)
.venv/bin/deepfleet down >/dev/null
.venv/bin/deepfleet up --ssh-config .lab/ssh_config --compose-override .lab/compose.override.yml \
  "${image_args[@]}" lab1 lab2 >.bench-logs/up-again.log; t3=$(now)
.venv/bin/deepfleet train --steps 60 --log-every 10 >.bench-logs/train.log; t4=$(now)
.venv/bin/deepfleet infer --prompt "The lighthouse keeper" --max-new-tokens 32 >.bench-logs/infer.log; t5=$(now)
size_mb=$(( $(docker image inspect "$image" --format '{{.Size}}') / 1000000 ))
result="$out_dir/bench-$(date +%Y%m%d-%H%M%S).json"
.venv/bin/deepfleet down >/dev/null
.venv/bin/python docker/lab.py down >/dev/null
.venv/bin/python - "$result" "$image" "$size_mb" "$t0" "$t1" "$t2" "$t3" "$t4" "$t5" <<'PY'
import json, re, sys, time
from pathlib import Path
path, image, size_mb, t = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), [float(x) for x in sys.argv[4:]]
up = Path(".bench-logs/up.log").read_text()
train = Path(".bench-logs/train.log").read_text()
streams = [float(m) for m in re.findall(r"streamed \d+ MB in [\d.]+s \((\d+) MB/s\)", up)]
toks = [float(m) for m in re.findall(r"tok/s (\d+)", train)]
losses = [float(m) for m in re.findall(r"step \d+/\d+ loss ([\d.]+)", train)]
result = {
    "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    "image": image,
    "image_size_MB": size_mb,
    "lab_up_s": round(t[1] - t[0], 1),
    "up_first_s (image streamed to 2 nodes)": round(t[2] - t[1], 1),
    "image_stream_MB_per_s_per_node": streams,
    "up_again_s (image present)": round(t[3] - t[2], 1),
    "train_60_steps_s (tiny model, ZeRO-2, 2 nodes, gloo)": round(t[4] - t[3], 1),
    "train_tokens_per_s_median": sorted(toks)[len(toks) // 2] if toks else None,
    "train_loss_first_last": [losses[0], losses[-1]] if losses else None,
    "infer_s (32 tokens, 2 replicas)": round(t[5] - t[4], 1),
}
path.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps(result, indent=2))
print(f"bench: saved {path}")
PY
# unlike machines: 3 lab machines at CPU quotas 0.9/0.5/0.3, balanced against an even split
.venv/bin/python scripts/bench_unlike.py "$result"
echo "bench: saved $result"
