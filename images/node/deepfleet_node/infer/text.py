"""Prompt text to model inputs and completions to text: one home for infer and serve, so
a served greedy completion equals infer's and the reference's."""

from __future__ import annotations


def encode_prompt(tokenizer, prompt: str, chat: bool):
    """A prompt's inputs: as is, or (chat) as one user message through the chat template."""
    if not chat:
        return tokenizer(prompt, return_tensors="pt")
    if not tokenizer.chat_template:
        raise SystemExit("--chat: this model's tokenizer has no chat template")
    return encode_chat(tokenizer, [{"role": "user", "content": prompt}])


def encode_chat(tokenizer, messages: list[dict]):
    """Messages through the model's chat template (infer --chat, and serve's chat requests)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The template writes its own special tokens (e.g. BOS); don't add a second set.
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)


def cut_at_stop(text: str, stops: list[str]) -> str:
    """text up to the first of the stop strings in it ("" stops nothing)."""
    cuts = [text.find(s) for s in stops if s and s in text]
    return text[: min(cuts)] if cuts else text
