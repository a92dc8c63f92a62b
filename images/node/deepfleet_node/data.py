"""Training data: load text/instruction examples, tokenize once, pack, shard by rank.

Batches are a pure function of (micro-batch number, rank, shares, seed), and what the job
as a whole trains on at each micro-step depends on (micro-batch number, global micro-batch
size, seed) alone, so a resumed run lands on exactly the data it would have seen without
the interruption, however its ranks split it, with no sampler state to checkpoint.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

IGNORE_INDEX = -100  # the label value HF causal-LM losses skip
DATA_SUFFIXES = (".txt", ".jsonl")
# Marker files that datasets.Dataset(Dict).save_to_disk leaves behind.
HF_DISK_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


# ---------------------------------------------------------------- loading


def load_examples(path: str | Path) -> list[dict[str, str]]:
    """Examples as dicts with "text", or with "prompt" and "completion"."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data path {path} does not exist")
    if path.is_dir() and any((path / m).exists() for m in HF_DISK_MARKERS):
        return load_hf_disk(path)
    files = [path] if path.is_file() else data_files_in(path)
    if not files:
        raise ValueError(f"no {'/'.join(DATA_SUFFIXES)} files under {path}")
    examples: list[dict[str, str]] = []
    for f in files:
        examples.extend(load_file(f))
    return examples


def data_files_in(directory: Path) -> list[Path]:
    # Sorted so every rank (and every rerun) sees the same order.
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)


def load_file(path: Path) -> list[dict[str, str]]:
    if path.suffix == ".jsonl":
        return load_jsonl(path)
    # A .txt file is one document; packing makes document boundaries matter little.
    return [{"text": path.read_text(encoding="utf-8")}]


def load_jsonl(path: Path) -> list[dict[str, str]]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                rows.append(normalize_row(json.loads(line), f"{path}:{lineno}"))
    return rows


def normalize_row(row: dict[str, Any], where: str) -> dict[str, str]:
    if "prompt" in row and "completion" in row:
        return {"prompt": str(row["prompt"]), "completion": str(row["completion"])}
    if "text" in row:
        return {"text": str(row["text"])}
    raise ValueError(f"{where}: need 'text' or 'prompt'+'completion', got {sorted(row)}")


def load_hf_disk(path: Path) -> list[dict[str, str]]:
    try:
        import datasets
    except ImportError as exc:
        raise RuntimeError(f"{path} is a datasets.save_to_disk dir; install `datasets`") from exc
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    return [normalize_row(row, f"{path}[{i}]") for i, row in enumerate(ds)]


# ---------------------------------------------------------------- tokenizing


def encode_example(tokenizer, example: dict[str, str]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one example; prompt positions get IGNORE_INDEX labels."""
    if "prompt" in example:
        prompt = tokenizer(example["prompt"])["input_ids"]
        answer = tokenizer(example["completion"], add_special_tokens=False)["input_ids"]
        answer = with_eos(tokenizer, answer)
        return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer
    # Same special tokens a prompt gets at inference time (e.g. BOS), then EOS so the
    # model learns where documents end.
    ids = with_eos(tokenizer, tokenizer(example["text"])["input_ids"])
    return ids, list(ids)


def with_eos(tokenizer, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is None or (ids and ids[-1] == eos):
        return list(ids)
    return list(ids) + [eos]


# ---------------------------------------------------------------- packing


@dataclass
class PackedDataset:
    """Fixed-length blocks: three [N, seq_len] LongTensors."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[i],
            "labels": self.labels[i],
            "attention_mask": self.attention_mask[i],
        }

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]


def pack(
    encoded: Iterable[tuple[list[int], list[int]]], seq_len: int, pad_id: int
) -> PackedDataset:
    """Concatenate all examples and cut into seq_len blocks.

    The tail is padded (labels IGNORE_INDEX, mask 0) rather than dropped so small
    datasets lose nothing.
    """
    ids: list[int] = []
    labels: list[int] = []
    for example_ids, example_labels in encoded:
        ids.extend(example_ids)
        labels.extend(example_labels)
    if not ids:
        raise ValueError("no tokens to train on")
    pad = (-len(ids)) % seq_len
    mask = [1] * len(ids) + [0] * pad
    ids += [pad_id] * pad
    labels += [IGNORE_INDEX] * pad
    shape = (-1, seq_len)
    return PackedDataset(
        torch.tensor(ids, dtype=torch.long).view(shape),
        torch.tensor(labels, dtype=torch.long).view(shape),
        torch.tensor(mask, dtype=torch.long).view(shape),
    )


def pad_id_of(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0


def build_packed(tokenizer, examples: Sequence[dict[str, str]], seq_len: int) -> PackedDataset:
    encoded = (encode_example(tokenizer, ex) for ex in examples)
    return pack(encoded, seq_len, pad_id_of(tokenizer))


# ---------------------------------------------------------------- user hook


def load_hook(spec: str) -> Callable[..., Any]:
    """Resolve "package.module:function"."""
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise ValueError(f"--prepare-dataset wants module:function, got {spec!r}")
    return getattr(importlib.import_module(module_name), func_name)


def from_hook(spec: str, tokenizer, seq_len: int, data: str | None, seed: int) -> PackedDataset:
    """Run a user's --prepare-dataset hook.

    The hook is called as fn(tokenizer=..., seq_len=..., data=<--data or None>, seed=...)
    and returns one of: a PackedDataset; a sequence of examples ({"text"} or
    {"prompt", "completion"}), which are then tokenized and packed here; or a sequence of
    tokenized blocks ({"input_ids"} plus optional "labels"/"attention_mask", each at most
    seq_len long), which are padded to seq_len.
    """
    result = load_hook(spec)(tokenizer=tokenizer, seq_len=seq_len, data=data, seed=seed)
    if isinstance(result, PackedDataset):
        return result
    rows = list(result)
    if not rows:
        raise ValueError(f"--prepare-dataset {spec} returned no rows")
    if "input_ids" in rows[0]:
        return stack_blocks(rows, seq_len, pad_id_of(tokenizer))
    examples = [normalize_row(row, f"{spec}[{i}]") for i, row in enumerate(rows)]
    return build_packed(tokenizer, examples, seq_len)


def stack_blocks(rows: Sequence[dict[str, Any]], seq_len: int, pad_id: int) -> PackedDataset:
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "attention_mask": []}
    for row in rows:
        ids = [int(t) for t in row["input_ids"]]
        if len(ids) > seq_len:
            raise ValueError(f"hook block has {len(ids)} tokens, more than --seq-len {seq_len}")
        labels = [int(t) for t in row.get("labels", ids)]
        mask = [int(t) for t in row.get("attention_mask", [1] * len(ids))]
        pad = seq_len - len(ids)
        out["input_ids"].append(ids + [pad_id] * pad)
        out["labels"].append(labels + [IGNORE_INDEX] * pad)
        out["attention_mask"].append(mask + [0] * pad)
    return PackedDataset(*(torch.tensor(out[k], dtype=torch.long) for k in out))


# ---------------------------------------------------------------- sharding


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """One seeded permutation of the n blocks per epoch, the same on every rank."""
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n, generator=generator).tolist()


def offsets(shares: Sequence[int]) -> list[int]:
    """Where each rank's slice of a global micro-batch starts."""
    starts, at = [], 0
    for share in shares:
        starts.append(at)
        at += share
    return starts


def shard_indices(
    n: int, rank: int, world: int, seed: int, epoch: int = 0, micro_batch: int = 1
) -> list[int]:
    """This rank's block indices for one epoch under an even split, micro-step by micro-step.

    Micro-step j of an epoch trains on the global micro-batch order[j*B:(j+1)*B] with
    B = micro_batch x world; rank r takes the r-th contiguous slice of micro_batch blocks.
    Shards are disjoint and equally sized; the tail of the permutation that fills no whole
    global micro-batch is left out this epoch.
    """
    global_batch = micro_batch * world
    if n < global_batch:
        raise ValueError(
            f"{n} blocks cannot fill a global micro-batch of {global_batch} "
            f"({micro_batch} x {world} ranks); lower --seq-len or --micro-batch"
        )
    order = epoch_order(n, seed, epoch)
    start = rank * micro_batch
    return [
        i
        for j in range(n // global_batch)
        for i in order[j * global_batch + start : j * global_batch + start + micro_batch]
    ]


class BatchStream:
    """Micro-batch number i -> the batch this rank trains on, across epoch boundaries.

    Micro-step i trains on one global micro-batch of micro_batch x world blocks, the same
    whatever the split; rank r takes the contiguous slice shares[r] of it. Shares can
    change between micro-steps (rebalancing) without changing what the job as a whole
    trains on, and a resumed run sees the same global data whatever its shares are.
    """

    def __init__(
        self,
        data: PackedDataset,
        rank: int,
        world: int,
        micro_batch: int,
        seed: int,
        shares: Sequence[int] | None = None,
    ):
        self.data = data
        self.rank = rank
        self.world = world
        self.micro_batch = micro_batch
        self.seed = seed
        self.global_batch = micro_batch * world
        self.per_epoch = len(data) // self.global_batch
        if self.per_epoch == 0:
            raise ValueError(
                f"{len(data)} blocks leave no full global micro-batch of {self.global_batch} "
                f"(micro-batch {micro_batch} x {world} ranks); lower --micro-batch or "
                "--seq-len, or add data"
            )
        self._epoch = -1
        self._order: list[int] = []
        self.set_shares(shares or [micro_batch] * world)

    def set_shares(self, shares: Sequence[int]) -> None:
        shares = [int(n) for n in shares]
        if len(shares) != self.world or any(n < 1 for n in shares):
            raise ValueError(f"need one share >= 1 per rank for {self.world} ranks, got {shares}")
        if sum(shares) != self.global_batch:
            raise ValueError(
                f"shares {shares} sum to {sum(shares)}, not the global micro-batch "
                f"{self.global_batch}"
            )
        self.shares = shares
        self._start = offsets(shares)[self.rank]

    @property
    def share(self) -> int:
        return self.shares[self.rank]

    def global_indices(self, i: int) -> list[int]:
        """The block indices the whole job trains on at micro-step i."""
        epoch, j = divmod(i, self.per_epoch)
        if epoch != self._epoch:
            self._order = epoch_order(len(self.data), self.seed, epoch)
            self._epoch = epoch
        return self._order[j * self.global_batch : (j + 1) * self.global_batch]

    def indices(self, i: int) -> list[int]:
        return self.global_indices(i)[self._start : self._start + self.share]

    def batch(self, i: int) -> dict[str, torch.Tensor]:
        index = torch.tensor(self.indices(i), dtype=torch.long)
        return {
            "input_ids": self.data.input_ids[index],
            "labels": self.data.labels[index],
            "attention_mask": self.data.attention_mask[index],
        }
