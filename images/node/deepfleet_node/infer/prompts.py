"""Prompts in, result rows out: the files infer reads and writes, and its log lines."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .._log import say


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt:
        return list(args.prompt)
    path = Path(args.prompts)
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":
        return [json.loads(line)["prompt"] for line in lines if line.strip()]
    return [line for line in lines if line.strip()]


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def show(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        # One line per prompt, so newlines are escaped for anyone grepping the log.
        prompt = row["prompt"].replace("\n", "\\n")
        completion = row["completion"].replace("\n", "\\n")
        say(f"[{row['index']}] {prompt} => {completion}")


def result(index: int, prompt: str, tokenizer, new_tokens) -> dict[str, Any]:
    return {
        "index": index,
        "prompt": prompt,
        "completion": tokenizer.decode(new_tokens, skip_special_tokens=True),
        "tokens": int(len(new_tokens)),
    }
