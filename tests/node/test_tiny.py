"""deepfleet_node.tiny: deterministic offline model + tokenizer."""

from __future__ import annotations

import pytest
from nodetools import require

require("torch")
require("transformers")

from deepfleet_node import tiny  # noqa: E402


def build(path, *extra):
    tiny.main(["--out", str(path), *extra])
    return path


def test_same_seed_gives_byte_identical_files(tmp_path, tiny_model):
    again = build(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_model / name).read_bytes(), name


def test_other_seed_gives_other_weights(tmp_path, tiny_model):
    other = build(tmp_path / "other", "--seed", "1")
    assert (other / "model.safetensors").read_bytes() != (
        tiny_model / "model.safetensors"
    ).read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (tiny_model / "tokenizer.json").read_bytes()


def test_model_loads_and_matches_tokenizer(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tok)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    ids = tok("The keeper", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))


def test_special_tokens_are_set(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}
    assert None not in ids and len(ids) == 3
    assert tok("boat")["input_ids"][0] == tok.bos_token_id


@pytest.mark.parametrize(
    "text",
    [
        tiny.read_corpus(),
        "Unseen words: zebra, quixotic, 42 ± 7 — naïve café 🚢\n\ttabs  and  spaces",
    ],
)
def test_tokenizer_round_trips(tiny_model, text):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = tok(text)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_compresses_corpus(tiny_model):
    from transformers import AutoTokenizer

    text = tiny.read_corpus()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    # BPE merges learned from this corpus should beat raw bytes by a wide margin.
    assert len(tok(text)["input_ids"]) < len(text.encode()) / 2.5


def test_data_out_repeats_corpus(tmp_path):
    path = tmp_path / "train.txt"
    tiny.main(["--data-out", str(path), "--data-repeat", "3"])
    text = path.read_text()
    assert text.count(tiny.read_corpus().strip()) == 3


def test_cli_needs_an_output():
    with pytest.raises(SystemExit):
        tiny.parse_args([])
