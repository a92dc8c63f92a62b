"""Build a tiny Llama-style model and tokenizer from a text corpus, fully offline.

The cluster has no route to the HF hub, so smoke tests and demos need a model that can
be made from nothing but the shipped corpus. Everything here is deterministic: the same
corpus, sizes and seed give byte-identical files, so runs on different nodes agree.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD, BOS, EOS, UNK = SPECIAL_TOKENS

# A plain-text chat template so `infer --chat` works on tiny models too; it only has to
# be stable, not match any real model family.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def default_corpus_path() -> Path:
    return Path(str(resources.files("deepfleet_node") / "demo" / "corpus.txt"))


def read_corpus(path: str | Path | None = None) -> str:
    return Path(path or default_corpus_path()).read_text(encoding="utf-8")


def train_tokenizer(text: str, vocab_size: int = 512):
    """Byte-level BPE, so any input round-trips exactly even if the corpus never saw it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # BOS on every encoded sequence: the model always sees a fixed first token, which
    # makes short prompts behave and matches what generation is compared against.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer, args: argparse.Namespace):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build(out: str | Path, args: argparse.Namespace) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(read_corpus(args.corpus), args.vocab_size)
    model = build_model(tokenizer, args)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def write_training_text(path: str | Path, corpus: str | Path | None, repeat: int) -> Path:
    """Training text the tiny model can visibly learn: the corpus, several times over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = read_corpus(corpus).strip() + "\n\n"
    path.write_text(text * repeat, encoding="utf-8")
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m deepfleet_node.tiny",
        description="Build a tiny Llama model + BPE tokenizer (and/or training text) offline.",
        epilog="At least one of --out and --data-out is required. "
        "Example: --out /tmp/tiny --data-out /tmp/train.txt",
    )
    p.add_argument("--out", help="directory for the model + tokenizer (save_pretrained)")
    p.add_argument("--corpus", help="text to train the tokenizer on (default: demo corpus)")
    p.add_argument("--seed", type=int, default=0, help="weight init seed")
    p.add_argument("--data-out", help="also write learnable training text to this .txt file")
    p.add_argument("--data-repeat", type=int, default=8, help="corpus copies in --data-out")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--intermediate-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--max-positions", type=int, default=512)
    args = p.parse_args(argv)
    if not args.out and not args.data_out:
        p.error("give --out and/or --data-out")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.out:
        print(f"built tiny model in {build(args.out, args)}", flush=True)
    if args.data_out:
        path = write_training_text(args.data_out, args.corpus, args.data_repeat)
        print(f"wrote training text {path}", flush=True)


if __name__ == "__main__":
    main()
