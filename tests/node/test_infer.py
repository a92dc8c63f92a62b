"""deepfleet_node.infer: greedy output must equal plain transformers generate()."""

from __future__ import annotations

from nodetools import require

require("torch")
require("deepspeed")
require("transformers")

from nodetools import NEW_TOKENS, PROMPTS, read_jsonl, run_module, run_ranks  # noqa: E402

from deepfleet_node.infer import cli  # noqa: E402
from deepfleet_node.infer.prompts import read_prompts  # noqa: E402
from deepfleet_node.infer.text import encode_prompt  # noqa: E402


def in_process(tmp_path, model_dir, *args):
    out = tmp_path / "out.jsonl"
    cli.main(["--model", str(model_dir), "--output", str(out), *map(str, args)])
    return read_jsonl(out)


def test_reference_rows_are_complete(reference):
    assert [r["index"] for r in reference] == list(range(len(PROMPTS)))
    assert [r["prompt"] for r in reference] == PROMPTS
    assert all(0 < r["tokens"] <= NEW_TOKENS and r["completion"] for r in reference)
    assert len({r["completion"] for r in reference}) > 1


def test_greedy_cli_equals_reference(tmp_path, model_dir, prompts_file, reference):
    out = tmp_path / "greedy.jsonl"
    log = run_module(
        "infer", "--model", model_dir, "--prompts", prompts_file, "--output", out,
        "--max-new-tokens", NEW_TOKENS, "--greedy",
    )  # fmt: skip
    assert read_jsonl(out) == reference
    assert "using deepspeed.init_inference" in log
    for row in reference:
        assert f"[{row['index']}] {row['prompt']} => {row['completion']}" in log


def test_reference_cli_writes_the_same_rows(tmp_path, model_dir, reference):
    out = tmp_path / "ref.jsonl"
    args = [a for p in PROMPTS for a in ("--prompt", p)]
    run_module("infer", "--reference", "--model", model_dir, *args, "--output", out,
               "--max-new-tokens", NEW_TOKENS)  # fmt: skip
    assert read_jsonl(out) == reference


def test_two_replicas_split_prompts_and_keep_order(tmp_path, model_dir, prompts_file, reference):
    out = tmp_path / "replicas.jsonl"
    logs = run_ranks(
        "infer", 2, "--model", model_dir, "--prompts", prompts_file, "--output", out,
        "--max-new-tokens", NEW_TOKENS,
    )  # fmt: skip
    assert read_jsonl(out) == reference
    assert "=>" in logs[0] and "=>" not in logs[1]


def test_stop_string_cuts_the_completion(tmp_path, model_dir, reference):
    full = reference[0]["completion"]
    stop = full.strip().split()[1]  # a word the greedy continuation really produces
    rows = in_process(tmp_path, model_dir, "--prompt", PROMPTS[0], "--stop", stop,
                      "--max-new-tokens", NEW_TOKENS)  # fmt: skip
    assert stop not in rows[0]["completion"]
    assert full.startswith(rows[0]["completion"])
    assert rows[0]["completion"] == full[: full.find(stop)]


def test_sampling_is_seeded(tmp_path, model_dir):
    args = ("--prompt", *PROMPTS[:2], "--temperature", "1.5", "--top-p", "0.95")
    a = in_process(tmp_path, model_dir, *args, "--seed", "1")
    b = in_process(tmp_path, model_dir, *args, "--seed", "1")
    c = in_process(tmp_path, model_dir, *args, "--seed", "2")
    assert a == b
    assert a != c


def test_chat_uses_the_template(tmp_path, model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = encode_prompt(tok, "Who waves?", chat=True)
    text = tok.decode(enc["input_ids"][0])
    assert text == "<s>user: Who waves?\nassistant:"
    rows = in_process(tmp_path, model_dir, "--prompt", "Who waves?", "--chat",
                      "--max-new-tokens", "4")  # fmt: skip
    assert rows[0]["prompt"] == "Who waves?" and rows[0]["tokens"] > 0


def test_prompts_from_txt_skip_blank_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first\n\nsecond line\n")
    args = cli.parse_args(["--model", "m", "--prompts", str(path), "--output", "o"])
    assert read_prompts(args) == ["first", "second line"]
