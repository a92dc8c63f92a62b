"""One model replica: loaded, warmed up and measured; turns a request into a Job and
generates it on its one worker thread, streaming NDJSON lines."""

from __future__ import annotations

import argparse
import contextlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .._log import say
from ..infer.text import cut_at_stop
from .loading import load_model
from .request import Job, RequestError, encode, one_line, read_body
from .stream import CLEANUP_PATTERNS, DeltaStreamer, cancel_criterion_class, line, watch_disconnect

DEFAULT_CONTEXT = 2048
WARMUP_PROMPT = "Hello, my name is"
WARMUP_TOKENS = 16


class Replica:
    def __init__(self, args: argparse.Namespace):
        self.name = args.name
        self.model_name = os.path.basename(os.path.normpath(os.path.abspath(args.model)))
        self.model, self.input_device, self.gpus, self.dtype_name = load_model(args)
        from transformers import AutoTokenizer

        # Two copies: requests are tokenized on the event loop while the worker thread
        # decodes, and one Rust tokenizer used from two threads can fail ("Already
        # borrowed").
        self.request_tokenizer = AutoTokenizer.from_pretrained(args.model)
        self.tokenizer = AutoTokenizer.from_pretrained(args.model)
        self.holdbacks = CLEANUP_PATTERNS if self.tokenizer.clean_up_tokenization_spaces else ()
        gen = self.model.generation_config
        if gen.pad_token_id is None:
            # Otherwise generate() warns on every request and picks EOS itself.
            pad = self.tokenizer.pad_token_id
            gen.pad_token_id = pad if pad is not None else first_id(gen.eos_token_id)
        eos = gen.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        config = self.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.max_context = int(getattr(text_config, "max_position_embeddings", 0) or 0)
        self.max_context = self.max_context or DEFAULT_CONTEXT
        self.tokens_per_s = 0.0
        # One thread: generations run one at a time, in the order they were submitted.
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")

    @property
    def device_label(self) -> str:
        return f"cuda:{','.join(map(str, self.gpus))}" if self.gpus else "cpu"

    def health(self) -> dict[str, Any]:
        return {
            "ready": True,
            "name": self.name,
            "model": self.model_name,
            "device": self.device_label,
            "dtype": self.dtype_name,
            "max_context": self.max_context,
            "chat_template": bool(self.request_tokenizer.chat_template),
            "tokens_per_s": round(self.tokens_per_s, 2),
        }

    def warm_up(self) -> None:
        """Pay for lazy set-up (kernels, allocator) before the port opens, and measure."""
        import torch

        inputs = self.tokenizer(WARMUP_PROMPT, return_tensors="pt").to(self.input_device)
        with torch.inference_mode():
            self.model.generate(**inputs, max_new_tokens=1, do_sample=False)
            began = time.perf_counter()
            out = self.model.generate(
                **inputs,
                max_new_tokens=WARMUP_TOKENS,
                min_new_tokens=WARMUP_TOKENS,
                do_sample=False,
            )
            if self.gpus:
                torch.cuda.synchronize(self.input_device)
        seconds = time.perf_counter() - began
        new = out.shape[1] - inputs["input_ids"].shape[1]
        self.tokens_per_s = new / seconds if seconds > 0 else 0.0

    def prepare(self, body: bytes) -> Job:
        req = read_body(body)
        inputs = encode(self.request_tokenizer, req)
        n = int(inputs["input_ids"].shape[1])
        if n == 0:
            raise RequestError("the prompt is empty once tokenized")
        if n + req["max_tokens"] > self.max_context:
            raise RequestError(
                f"prompt_tokens {n} + max_tokens {req['max_tokens']} = {n + req['max_tokens']}"
                f" exceeds the model's context of {self.max_context} tokens"
            )
        return Job(
            inputs=inputs,
            prompt_tokens=n,
            max_tokens=req["max_tokens"],
            temperature=req["temperature"],
            top_p=req["top_p"],
            seed=req["seed"],
            stops=req["stop"],
        )

    def generation_kwargs(self, job: Job, streamer, cancel: threading.Event) -> dict[str, Any]:
        from transformers import StoppingCriteriaList

        kwargs: dict[str, Any] = {
            "max_new_tokens": job.max_tokens,
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([cancel_criterion_class()(cancel)]),
        }
        if job.temperature:  # null or 0: greedy
            kwargs.update(do_sample=True, temperature=job.temperature, top_p=job.top_p or 1.0)
        else:
            kwargs["do_sample"] = False
        if job.stops:
            # Ends generation early; the text is still cut at the stop string afterwards.
            kwargs.update(stop_strings=job.stops, tokenizer=self.tokenizer)
        return kwargs

    def run(self, job: Job, cancel: threading.Event, emit) -> None:
        """On the worker thread: generate, emitting ("text", delta) as it goes, then one of
        ("done", summary), ("error", message) or ("cancelled", None)."""
        if cancel.is_set():  # the client left while this waited its turn
            emit(("cancelled", None))
            return
        try:
            import torch
            from transformers import set_seed

            streamer = DeltaStreamer(self.tokenizer, job.stops, self.holdbacks, emit)
            inputs = {k: v.to(self.input_device) for k, v in job.inputs.items()}
            if job.seed is not None:
                set_seed(job.seed)
            with torch.inference_mode():
                out = self.model.generate(**inputs, **self.generation_kwargs(job, streamer, cancel))
            new = out[0, job.prompt_tokens :].tolist()
            if cancel.is_set():
                say(f"{self.name}: request cancelled after {len(new)} of {job.max_tokens} tokens")
                emit(("cancelled", None))
                return
            whole = self.tokenizer.decode(new, skip_special_tokens=True)
            text = cut_at_stop(whole, job.stops)
            if not streamer.finish(text):
                say(f"{self.name}: note: streamed text differs from the decoded completion")
            ended = bool(new) and new[-1] in self.eos_ids
            length = len(new) >= job.max_tokens and not ended and text == whole
            emit(
                (
                    "done",
                    {
                        "done": True,
                        "finish_reason": "length" if length else "stop",
                        "prompt_tokens": job.prompt_tokens,
                        "completion_tokens": len(new),
                    },
                )
            )
        except Exception as exc:  # noqa: BLE001 - the stream's last line says what failed
            import traceback

            traceback.print_exc()
            emit(("error", f"generation failed: {type(exc).__name__}: {one_line(exc)}"))

    async def stream(self, job: Job, receive):
        """The response body: NDJSON lines as the worker produces them."""
        import asyncio

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def emit(item) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server stopped
                loop.call_soon_threadsafe(queue.put_nowait, item)

        # Its own task, not this generator's finally alone: a body iterator abandoned
        # at a yield is never closed, and its generation would run on to max_tokens.
        watcher = loop.create_task(watch_disconnect(receive, cancel))
        loop.run_in_executor(self.worker, self.run, job, cancel, emit)
        try:
            while True:
                kind, payload = await queue.get()
                if kind == "text":
                    yield line({"text": payload})
                elif kind == "done":
                    yield line(payload)
                    return
                elif kind == "error":
                    yield line({"error": payload})
                    return
                else:
                    return
        finally:
            cancel.set()
            watcher.cancel()


def first_id(ids) -> int | None:
    return ids[0] if isinstance(ids, list) and ids else ids if isinstance(ids, int) else None
