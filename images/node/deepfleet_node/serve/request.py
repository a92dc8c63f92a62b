"""A /generate request: its JSON body checked for shape and range, and its prompt
tokenized as infer does it. What the client got wrong is a RequestError (a 400)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from ..infer.text import encode_chat

DEFAULT_MAX_TOKENS = 16
FIELDS = ("prompt", "messages", "max_tokens", "temperature", "top_p", "seed", "stop")


class RequestError(ValueError):
    """What the client got wrong: answered 400 with this message."""


@dataclass
class Job:
    """One validated /generate request, its prompt already tokenized."""

    inputs: Any  # the tokenizer's BatchEncoding (input_ids, attention_mask), on the CPU
    prompt_tokens: int
    max_tokens: int
    temperature: float | None
    top_p: float | None
    seed: int | None
    stops: list[str]


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def read_body(body: bytes) -> dict[str, Any]:
    """The request's fields, checked for shape and range; defaults filled in."""
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"the body is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise RequestError("the body must be a JSON object")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise RequestError(f"unknown fields {unknown}; known: {list(FIELDS)}")
    if ("prompt" in obj) == ("messages" in obj):
        raise RequestError('give exactly one of "prompt" and "messages"')
    req = {
        "max_tokens": DEFAULT_MAX_TOKENS,
        "temperature": None,
        "top_p": None,
        "seed": None,
        "stop": [],
        **obj,
    }
    if "prompt" in obj and not isinstance(obj["prompt"], str):
        raise RequestError('"prompt" must be a string')
    if "messages" in obj:
        check_messages(obj["messages"])
    if not is_int(req["max_tokens"]) or req["max_tokens"] < 1:
        raise RequestError(f'"max_tokens" must be an integer >= 1, got {req["max_tokens"]!r}')
    temperature = req["temperature"]
    if temperature is not None and not (is_number(temperature) and temperature >= 0):
        raise RequestError(f'"temperature" must be null or a number >= 0, got {temperature!r}')
    top_p = req["top_p"]
    if top_p is not None and not (is_number(top_p) and 0 < top_p <= 1):
        raise RequestError(f'"top_p" must be null or a number in (0, 1], got {top_p!r}')
    seed = req["seed"]
    # numpy, which set_seed also seeds, takes only 32-bit unsigned seeds.
    if seed is not None and not (is_int(seed) and 0 <= seed < 2**32):
        raise RequestError(f'"seed" must be null or an integer in [0, 2**32), got {seed!r}')
    stop = req["stop"]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError('"stop" must be a list of strings')
    # "" would match at once; infer drops it the same way.
    req["stop"] = [s for s in stop if s]
    return req


def check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise RequestError('"messages" must be a non-empty list')
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or set(m) != {"role", "content"}
            or not all(isinstance(m[k], str) for k in ("role", "content"))
        ):
            raise RequestError(f'messages[{i}] must be {{"role": str, "content": str}}')


def encode(tokenizer, req: dict[str, Any]):
    """Tokenized exactly as infer does it, so greedy text equals infer's and the reference."""
    if "prompt" in req:
        return tokenizer(req["prompt"], return_tensors="pt")
    if not tokenizer.chat_template:
        raise RequestError('this model\'s tokenizer has no chat template; send "prompt"')
    try:
        return encode_chat(tokenizer, req["messages"])
    except Exception as exc:  # noqa: BLE001 - a template refusing these messages (its raise_exception)
        raise RequestError(f"the chat template refused these messages: {one_line(exc)}") from None


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
