"""deepfleet_node.data: loading, prompt masking, packing, sharding, the user hook."""

from __future__ import annotations

import json
import sys

import pytest
from nodetools import require

torch = require("torch")
require("transformers")

from deepfleet_node import data  # noqa: E402


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompt_tokens_are_masked(tok):
    ids, labels = data.encode_example(tok, {"prompt": "Who waves?", "completion": " The baker."})
    n_prompt = len(tok("Who waves?")["input_ids"])
    assert len(ids) == len(labels) > n_prompt
    assert labels[:n_prompt] == [data.IGNORE_INDEX] * n_prompt
    assert data.IGNORE_INDEX not in labels[n_prompt:]
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tok.eos_token_id


def test_text_examples_are_fully_labelled(tok):
    ids, labels = data.encode_example(tok, {"text": "The sea is grey."})
    assert ids == labels
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id


def test_masking_survives_packing(tok):
    examples = [{"prompt": f"Question {i}?", "completion": f" Answer {i}."} for i in range(20)]
    packed = data.build_packed(tok, examples, seq_len=16)
    flat_ids = packed.input_ids.flatten().tolist()
    flat_labels = packed.labels.flatten().tolist()
    pos = 0
    for ex in examples:
        ids, labels = data.encode_example(tok, ex)
        assert flat_ids[pos : pos + len(ids)] == ids
        assert flat_labels[pos : pos + len(ids)] == labels
        pos += len(ids)
    assert set(flat_labels[pos:]) <= {data.IGNORE_INDEX}


def test_pack_pads_the_tail():
    packed = data.pack([([1, 2, 3, 4, 5], [1, 2, 3, 4, 5]), ([6, 7], [-100, 7])], 3, pad_id=0)
    assert packed.input_ids.tolist() == [[1, 2, 3], [4, 5, 6], [7, 0, 0]]
    assert packed.labels.tolist() == [[1, 2, 3], [4, 5, -100], [7, -100, -100]]
    assert packed.attention_mask.tolist() == [[1, 1, 1], [1, 1, 1], [1, 0, 0]]
    assert len(packed) == 3 and packed.seq_len == 3


@pytest.mark.parametrize("n,world", [(10, 1), (10, 2), (11, 3), (64, 4)])
def test_shards_are_disjoint_and_equal(n, world):
    shards = [data.shard_indices(n, r, world, seed=5, epoch=0) for r in range(world)]
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat)) == (n // world) * world
    assert all(len(s) == n // world for s in shards)
    assert set(flat) <= set(range(n))


def test_shards_are_seeded_and_reshuffled_per_epoch():
    assert data.shard_indices(50, 0, 2, seed=1) == data.shard_indices(50, 0, 2, seed=1)
    assert data.shard_indices(50, 0, 2, seed=1) != data.shard_indices(50, 0, 2, seed=2)
    assert data.shard_indices(50, 0, 2, seed=1, epoch=0) != data.shard_indices(50, 0, 2, 1, 1)


def test_too_few_blocks_for_world_is_an_error():
    with pytest.raises(ValueError):
        data.shard_indices(1, 0, 2, seed=0)


def test_batch_stream_covers_each_rank_shard_once_per_epoch():
    n, world, micro = 40, 2, 4
    packed = data.pack([(list(range(n * 2)), list(range(n * 2)))], 2, pad_id=0)
    seen = []
    for rank in range(world):
        stream = data.BatchStream(packed, rank, world, micro, seed=3)
        assert stream.per_epoch == n // world // micro
        rows = [stream.batch(i)["input_ids"] for i in range(stream.per_epoch)]
        firsts = torch.cat(rows)[:, 0].tolist()
        assert len(firsts) == len(set(firsts)) == n // world
        seen.append(set(firsts))
        again = data.BatchStream(packed, rank, world, micro, seed=3)
        assert torch.equal(again.batch(stream.per_epoch + 1)["input_ids"],
                           stream.batch(stream.per_epoch + 1)["input_ids"])  # fmt: skip
    assert not seen[0] & seen[1]


def numbered_blocks(n):
    """n one-token-wide blocks whose input_ids say which block they are."""
    return data.pack([(list(range(n)), list(range(n)))], 1, pad_id=0)


def rows_of(stream, i):
    return stream.batch(i)["input_ids"][:, 0].tolist()


@pytest.mark.parametrize("shares", [[3, 1], [1, 3], [2, 2]])
def test_any_split_covers_the_same_global_micro_batch(shares):
    n, world, micro = 37, 2, 2
    packed = numbered_blocks(n)
    even = [data.BatchStream(packed, r, world, micro, seed=4) for r in range(world)]
    split = [data.BatchStream(packed, r, world, micro, seed=4, shares=shares) for r in range(world)]
    assert split[0].per_epoch == n // (micro * world) == 9
    for i in range(2 * split[0].per_epoch + 3):  # across two epoch boundaries
        parts = [rows_of(s, i) for s in split]
        assert [len(p) for p in parts] == shares
        # contiguous slices, in rank order, of one global micro-batch
        assert parts[0] + parts[1] == split[0].global_indices(i)
        assert sorted(parts[0] + parts[1]) == sorted(rows_of(even[0], i) + rows_of(even[1], i))


def test_even_split_matches_shard_indices():
    n, world, micro = 40, 2, 4
    packed = numbered_blocks(n)
    for rank in range(world):
        stream = data.BatchStream(packed, rank, world, micro, seed=3)
        rows = [row for i in range(stream.per_epoch) for row in rows_of(stream, i)]
        assert rows == data.shard_indices(n, rank, world, seed=3, epoch=0, micro_batch=micro)


def test_resplitting_mid_run_keeps_the_global_data():
    """A rebalance, or a resume with other shares, trains on the same samples per step."""
    packed = numbered_blocks(30)
    fixed = [data.BatchStream(packed, r, 3, 2, seed=9, shares=[4, 1, 1]) for r in range(3)]
    moved = [data.BatchStream(packed, r, 3, 2, seed=9) for r in range(3)]
    for i in range(12):
        if i == 5:
            for s in moved:
                s.set_shares([1, 2, 3])
        assert sorted(sum((rows_of(s, i) for s in moved), [])) == sorted(
            sum((rows_of(s, i) for s in fixed), [])
        )
    assert [len(rows_of(s, 6)) for s in moved] == [1, 2, 3]


@pytest.mark.parametrize("shares", [[3, 2], [4, 0], [4], [2, 1, 1]])
def test_bad_shares_are_rejected(shares):
    with pytest.raises(ValueError):
        data.BatchStream(numbered_blocks(20), 0, 2, 2, seed=0, shares=shares)


def test_too_little_data_for_the_global_micro_batch_is_an_error():
    with pytest.raises(ValueError, match="global micro-batch of 8"):
        data.BatchStream(numbered_blocks(7), 0, 2, 4, seed=0)


def test_load_examples_from_files_and_dirs(tmp_path):
    (tmp_path / "b.txt").write_text("plain text")
    write_jsonl(tmp_path / "a.jsonl", [{"text": "t"}, {"prompt": "p", "completion": "c"}])
    (tmp_path / "ignored.csv").write_text("x")
    assert data.load_examples(tmp_path) == [
        {"text": "t"},
        {"prompt": "p", "completion": "c"},
        {"text": "plain text"},
    ]
    assert data.load_examples(tmp_path / "b.txt") == [{"text": "plain text"}]


def test_jsonl_rows_without_known_fields_fail(tmp_path):
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        data.load_examples(write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"foo": 1}]))


HOOK_MODULE = """
def examples(tokenizer, seq_len, data, seed):
    return [{"prompt": "Q" * (seed + 1), "completion": " A"}, {"text": "more text"}]

def blocks(tokenizer, seq_len, data, seed):
    return [{"input_ids": [5, 6, 7]}, {"input_ids": [8], "labels": [-100]}]
"""


def test_prepare_dataset_hook(tmp_path, tok, monkeypatch):
    (tmp_path / "user_hooks.py").write_text(HOOK_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    packed = data.from_hook("user_hooks:examples", tok, 8, None, seed=0)
    expected = data.build_packed(
        tok, [{"prompt": "Q", "completion": " A"}, {"text": "more text"}], 8
    )
    assert torch.equal(packed.labels, expected.labels)
    blocks = data.from_hook("user_hooks:blocks", tok, 4, None, seed=0)
    assert blocks.input_ids.tolist() == [[5, 6, 7, tok.pad_token_id], [8] + [tok.pad_token_id] * 3]
    assert blocks.labels.tolist() == [[5, 6, 7, -100], [-100] * 4]
    assert blocks.attention_mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    sys.modules.pop("user_hooks", None)


def test_bad_hook_spec_is_rejected():
    with pytest.raises(ValueError):
        data.load_hook("no_colon_here")


def test_datasets_save_to_disk_dirs_load(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"prompt": ["p1", "p2"], "completion": ["c1", "c2"]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(tmp_path / "dd")
    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(tmp_path / "d")
    assert data.load_examples(tmp_path / "dd") == [
        {"prompt": "p1", "completion": "c1"},
        {"prompt": "p2", "completion": "c2"},
    ]
    assert data.load_examples(tmp_path / "d") == [{"text": "a"}, {"text": "b"}]
