"""Streaming a completion as it is generated: text deltas that add up to the decoded
completion, never past a stop string; cancelling when the client goes; NDJSON lines."""

from __future__ import annotations

import json
import threading
from functools import cache
from typing import Any

# transformers' clean_up_tokenization rewrites these when a later token completes them
# (" ." becomes "."); a tokenizer that applies it can change text already decoded, so
# while one of them may still be forming its start is not streamed yet.
CLEANUP_PATTERNS = (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're")


def streamable(text: str, stops: list[str], holdbacks: tuple[str, ...]) -> tuple[int, bool]:
    """(how much of text may be sent now, whether a stop string has been reached).

    Text from the first stop string on is never sent; neither is a tail that could
    still grow into a stop string (or a holdback pattern), nor a trailing U+FFFD, which
    byte-level tokenizers write for a character whose bytes are not all generated yet.
    """
    cuts = [text.find(s) for s in stops if s in text]
    if cuts:
        return min(cuts), True
    end = len(text)
    for pattern in (*stops, *holdbacks):
        for k in range(min(len(pattern) - 1, len(text)), 0, -1):
            if text.endswith(pattern[:k]):
                end = min(end, len(text) - k)
                break
    while end and text[end - 1] == "\ufffd":
        end -= 1
    return end, False


class DeltaStreamer:
    """transformers' streamer interface (put/end): hands out text as tokens arrive.

    Each step decodes all new tokens again instead of one token at a time, because a
    token's text can depend on its neighbours (byte-level pieces of one character,
    clean-up rules), and the deltas must add up to exactly what decoding the whole
    completion gives.
    """

    def __init__(self, tokenizer, stops: list[str], holdbacks: tuple[str, ...], emit):
        self.tokenizer = tokenizer
        self.stops = stops
        self.holdbacks = holdbacks
        self.emit = emit
        self.ids: list[int] = []
        self.sent = ""
        self.prompt_seen = False
        self.stopped = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate hands over the prompt first
            self.prompt_seen = True
            return
        if self.stopped:
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        end, self.stopped = streamable(text, self.stops, self.holdbacks)
        self.send(text[:end])

    def end(self) -> None:
        pass

    def send(self, upto: str) -> None:
        """Send what upto adds to the text already sent."""
        if len(upto) > len(self.sent) and upto.startswith(self.sent):
            self.emit(("text", upto[len(self.sent) :]))
            self.sent = upto

    def finish(self, text: str) -> bool:
        """Send the rest of the final text; False if it disagrees with what was sent."""
        self.send(text)
        return self.sent == text


@cache
def cancel_criterion_class():
    import torch
    from transformers import StoppingCriteria

    class Cancelled(StoppingCriteria):
        """Ends generation after the current token once the client has gone."""

        def __init__(self, flag: threading.Event):
            self.flag = flag

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full(
                (input_ids.shape[0],), self.flag.is_set(), dtype=torch.bool, device=input_ids.device
            )

    return Cancelled


async def watch_disconnect(receive, cancel: threading.Event) -> None:
    # uvicorn answers http.disconnect once the client has gone or the response is
    # complete; either way nothing more of this generation will be read.
    while (await receive())["type"] != "http.disconnect":
        pass
    cancel.set()


def line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()
