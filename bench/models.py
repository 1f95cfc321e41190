"""Benchmark models: real architectures at real sizes, random weights, built locally (no download).

The tokenizer is a word-level vocabulary of synthetic words (``w0`` … ``w50255``), so a prompt of n
words is exactly n tokens and the model's whole vocabulary decodes. Weights are seeded and saved with
``save_pretrained``, so workers load them through the same ``from_pretrained`` path as any model.
"""

from __future__ import annotations

import random
from pathlib import Path

from bench.common import CACHE

GPT2_VOCAB = 50257


def word_tokenizer(vocab_size: int, eos: str | None = "<|endoftext|>", specials: list[str] | None = None):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = list(specials or [])
    if eos and eos not in special:
        special.append(eos)
    words = [f"w{i}" for i in range(vocab_size - len(special))]
    vocab = {w: i for i, w in enumerate(words + special)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=special[0] if special else words[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    kwargs = {"eos_token": eos, "pad_token": eos, "bos_token": eos} if eos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1024, **kwargs)


def byte_bpe_tokenizer(vocab_size: int = GPT2_VOCAB, root: Path = CACHE):  # type: ignore[no-untyped-def]
    """A GPT-2 style byte-level BPE of ``vocab_size`` tokens, trained here on the Python standard library.

    Structured output cares about what a vocabulary's tokens look like (multi-character pieces, a
    leading space, partial UTF-8 bytes), which the word-level tokenizer above does not have. Its 13 MB
    of source and docstrings train a full 50k vocabulary in about 10 s; the result is cached.
    """
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = root / f"byte-bpe-{vocab_size}"
    if not (out / "tokenizer.json").exists():
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(str(p) for p in stdlib.rglob("*.py") if not {"test", "tests", "site-packages"} & set(p.parts))
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train(files, trainer)
        eos = "<|endoftext|>"
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token=eos, eos_token=eos, unk_token=eos, pad_token=eos, model_max_length=1024
        )
        fast.save_pretrained(out)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out)


def gpt2_124m_bpe(root: Path = CACHE) -> Path:
    """GPT-2 small (124M) with the byte-level BPE above: a vocabulary JSON can be written in, at full size."""
    out = root / "gpt2-124m-bpe"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tok = byte_bpe_tokenizer(GPT2_VOCAB, root)
    cfg = GPT2Config(
        vocab_size=GPT2_VOCAB,
        n_positions=1024,
        n_embd=768,
        n_layer=12,
        n_head=12,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def gpt2_124m(root: Path = CACHE) -> Path:
    """GPT-2 small (124M parameters): 12 layers, 12 heads, width 768, vocabulary 50257."""
    out = root / "gpt2-124m"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tok = word_tokenizer(GPT2_VOCAB)
    cfg = GPT2Config(
        vocab_size=GPT2_VOCAB,
        n_positions=1024,
        n_embd=768,
        n_layer=12,
        n_head=12,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def distilbert(root: Path = CACHE) -> tuple[Path, Path]:
    """DistilBERT-base size (66M): a masked LM and a 2-label classifier sharing one tokenizer."""
    mlm, cls = root / "distilbert-mlm", root / "distilbert-cls"
    if (mlm / "config.json").exists() and (cls / "config.json").exists():
        return mlm, cls
    import torch
    from transformers import DistilBertConfig, DistilBertForMaskedLM, DistilBertForSequenceClassification

    torch.manual_seed(0)
    tok = word_tokenizer(30522, eos=None, specials=["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"])
    tok.add_special_tokens(
        {"unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}
    )
    base = {"vocab_size": 30522, "pad_token_id": tok.pad_token_id}
    DistilBertForMaskedLM(DistilBertConfig(**base)).save_pretrained(mlm)
    tok.save_pretrained(mlm)
    labels = {0: "NEGATIVE", 1: "POSITIVE"}
    DistilBertForSequenceClassification(
        DistilBertConfig(**base, id2label=labels, label2id={v: k for k, v in labels.items()})
    ).save_pretrained(cls)
    tok.save_pretrained(cls)
    return mlm, cls


def mixed_prompts(n: int = 256, lo: int = 16, hi: int = 128, vocab: int = 50000, seed: int = 0) -> list[str]:
    """``n`` prompts of uniformly mixed lengths, as text (one synthetic word per token)."""
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(vocab)}" for _ in range(rng.randint(lo, hi))) for _ in range(n)]


LLAMA_SHAPES = {
    # the shape of a Llama-style model with grouped-query attention (4 query heads per KV head),
    # at sizes a shared 2-core CPU runs a few thousand lines through in minutes
    "tiny": {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4, "num_attention_heads": 8},
    "small": {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 6, "num_attention_heads": 8},
}
LLAMA_VOCAB = 8192


def llama_gqa(size: str = "tiny", root: Path = CACHE) -> Path:
    """A Llama-style decoder with grouped-query attention (8 query heads, 2 KV heads), random weights."""
    out = root / f"llama-gqa-{size}"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = word_tokenizer(LLAMA_VOCAB)
    shape = LLAMA_SHAPES[size]
    cfg = LlamaConfig(
        vocab_size=LLAMA_VOCAB,
        num_key_value_heads=shape["num_attention_heads"] // 4,
        max_position_embeddings=1024,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
        **shape,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def words(n: int, rng: random.Random, vocab: int = LLAMA_VOCAB - 1) -> str:
    """``n`` synthetic words: exactly ``n`` tokens for the word-level tokenizers above."""
    return " ".join(f"w{rng.randrange(vocab)}" for _ in range(n))
