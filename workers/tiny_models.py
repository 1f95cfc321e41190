"""Build the offline tiny models: real architectures, real tokenizers, a few seconds of training each.

``queueformer models build-tiny DIR`` writes five models with ``save_pretrained`` — a GPT-2 causal LM,
a BERT masked LM, a DistilBERT sentiment classifier with named labels, a Marian en->de translator and
a many-to-many M2M100 translator (en <-> de, the language picked by its forced first token) —
with tokenizers built with ``tokenizers`` from the corpus shipped in ``queueformer/data``. They load
through the same ``AutoModelFor*``/``AutoTokenizer`` calls as hub models. Seeds are fixed and the
vocabularies do not depend on hash order, so a build is deterministic on a given machine; a build
made by another recipe (this module, the data, the libraries) is made again. Every layer width is a
multiple of 64 so bitsandbytes 4-bit blocks fit. A short training run makes their outputs readable in
the demo, not random noise.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    M2M100Config,
    M2M100ForConditionalGeneration,
    MarianConfig,
    MarianMTModel,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

log = logging.getLogger(__name__)

NAMES = ("tiny-gpt2", "tiny-bert", "tiny-sentiment", "tiny-marian-en-de", "tiny-m2m")
_WIDTH = 64  # hidden size: a multiple of bitsandbytes' 4-bit block size


def _data(name: str) -> str:
    return resources.files("queueformer.data").joinpath(name).read_text("utf-8")


def corpus() -> list[str]:
    return [line.strip() for line in _data("corpus.txt").splitlines() if line.strip()]


def sentiment() -> list[tuple[str, str]]:
    rows = [line.split("\t", 1) for line in _data("sentiment.tsv").splitlines() if "\t" in line]
    return [(label, text) for label, text in rows]


def en_de() -> list[tuple[str, str]]:
    rows = [line.split("\t", 1) for line in _data("en_de.tsv").splitlines() if "\t" in line]
    return [(en, de) for en, de in rows]


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _train(
    model: PreTrainedModel, steps: int, batch: Callable[[int], dict[str, torch.Tensor]], lr: float = 3e-3
) -> float:
    """A few hundred AdamW steps; returns the last loss."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    loss = torch.tensor(0.0)
    for step in range(steps):
        out = model(**batch(step))
        loss = out.loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return float(loss.detach())


def _batches(texts: list[Any], size: int, step: int) -> list[Any]:
    rng = random.Random(step)
    return rng.sample(texts, min(size, len(texts)))


# --- tokenizers ----------------------------------------------------------------------------------


# A plain role-prefixed chat format, so /v1/chat/completions runs on the tiny causal LM too.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=256,
    )


def wordpiece_vocab(
    texts: Iterable[str],
    vocab_size: int,
    specials: list[str],
    normalizer: normalizers.Normalizer,
    pre_tokenizer: pre_tokenizers.PreTokenizer,
) -> dict[str, int]:
    """Specials, every character alone and as a ``##`` continuation, then the most frequent words.

    Built here rather than by ``WordPieceTrainer``, whose vocabulary differs from process to process
    (ties broken in hash order), which made every fresh build of the tiny BERT models a different model.
    Ties are broken by the word itself, so the same corpus always gives the same ids.
    """
    counts = Counter(
        word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    )
    chars = sorted({c for word in counts for c in word})
    tokens = [*specials, *chars, *(f"##{c}" for c in chars)]
    seen = set(tokens)
    for word in sorted(counts, key=lambda w: (-counts[w], w)):
        if len(tokens) >= vocab_size:
            break
        if word not in seen:
            tokens.append(word)
            seen.add(word)
    return {token: i for i, token in enumerate(tokens)}


def wordpiece_tokenizer(texts: Iterable[str], vocab_size: int = 640) -> PreTrainedTokenizerFast:
    """BERT style uncased WordPiece with [CLS] ... [SEP] framing."""
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = wordpiece_vocab(texts, vocab_size, specials, normalizer, pre_tokenizer)
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    )


def marian_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """One BPE vocabulary shared by source and target, each sequence closed by </s> (Marian's framing)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], show_progress=False),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=128
    )


# --- models --------------------------------------------------------------------------------------


def build_gpt2(out: Path, seed: int = 0, steps: int = 300) -> float:
    _seed(seed)
    texts = corpus()
    tok = bpe_tokenizer(texts)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=256,
        n_embd=_WIDTH,
        n_layer=2,
        n_head=4,
        n_inner=4 * _WIDTH,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = GPT2LMHeadModel(cfg)
    eos = tok.eos_token

    def batch(step: int) -> dict[str, torch.Tensor]:
        enc = tok([t + eos for t in _batches(texts, 16, step)], return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        return {**enc, "labels": labels}

    loss = _train(model, steps, batch)
    tok.chat_template = CHAT_TEMPLATE
    _save(model, tok, out)
    return loss


def build_bert(out: Path, seed: int = 0, steps: int = 400) -> float:
    _seed(seed)
    texts = corpus()
    tok = wordpiece_tokenizer(texts + [t for _, t in sentiment()])
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=4 * _WIDTH,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForMaskedLM(cfg)
    specials = set(tok.all_special_ids)

    def batch(step: int) -> dict[str, torch.Tensor]:
        enc = tok(_batches(texts, 16, step), return_tensors="pt", padding=True)
        ids = enc["input_ids"].clone()
        g = torch.Generator().manual_seed(step)
        maskable = enc["attention_mask"].bool() & ~torch.isin(ids, torch.tensor(sorted(specials)))
        chosen = (torch.rand(ids.shape, generator=g) < 0.2) & maskable
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        enc["input_ids"] = torch.where(chosen, torch.full_like(ids, tok.mask_token_id), ids)
        return {**enc, "labels": labels}

    loss = _train(model, steps, batch)
    _save(model, tok, out)
    return loss


def build_sentiment(out: Path, seed: int = 0, steps: int = 200) -> float:
    _seed(seed)
    rows = sentiment()
    labels = ["NEGATIVE", "POSITIVE"]
    tok = wordpiece_tokenizer(corpus() + [t for _, t in rows])
    cfg = DistilBertConfig(
        vocab_size=len(tok),
        dim=_WIDTH,
        n_layers=2,
        n_heads=4,
        hidden_dim=4 * _WIDTH,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    model = DistilBertForSequenceClassification(cfg)

    def batch(step: int) -> dict[str, torch.Tensor]:
        picked = _batches(rows, 16, step)
        enc = tok([t for _, t in picked], return_tensors="pt", padding=True)
        enc.pop("token_type_ids", None)
        return {**enc, "labels": torch.tensor([labels.index(lbl) for lbl, _ in picked])}

    loss = _train(model, steps, batch)
    _save(model, tok, out)
    return loss


def build_marian(out: Path, seed: int = 0, steps: int = 500) -> float:
    _seed(seed)
    pairs = en_de()
    tok = marian_tokenizer([en for en, _ in pairs] + [de for _, de in pairs] + corpus())
    pad = tok.pad_token_id
    cfg = MarianConfig(
        vocab_size=len(tok),
        d_model=_WIDTH,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=4 * _WIDTH,
        decoder_ffn_dim=4 * _WIDTH,
        max_position_embeddings=128,
        pad_token_id=pad,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=pad,
        forced_eos_token_id=tok.eos_token_id,
        share_encoder_decoder_embeddings=True,
        dropout=0.0,
    )
    model = MarianMTModel(cfg)

    def batch(step: int) -> dict[str, torch.Tensor]:
        picked = _batches(pairs, 16, step)
        enc = tok([en for en, _ in picked], text_target=[de for _, de in picked], return_tensors="pt", padding=True)
        enc["labels"] = enc["labels"].masked_fill(enc["labels"] == pad, -100)
        enc.pop("token_type_ids", None)
        return dict(enc)

    loss = _train(model, steps, batch)
    _save(model, tok, out)
    return loss


LANGUAGES = ("en", "de")


def build_m2m(out: Path, seed: int = 0, steps: int = 300) -> float:
    """A many-to-many M2M100 translator (en <-> de): the output language is the token forced first
    (``__de__``, ``__en__``), as for M2M100, NLLB and mBART-50, so ``target_language`` picks it."""
    _seed(seed)
    pairs = en_de()
    tok = marian_tokenizer([en for en, _ in pairs] + [de for _, de in pairs] + corpus())
    tok.add_special_tokens({"additional_special_tokens": [f"__{lang}__" for lang in LANGUAGES]})
    lang = {code: tok.convert_tokens_to_ids(f"__{code}__") for code in LANGUAGES}
    pad, eos = tok.pad_token_id, tok.eos_token_id
    cfg = M2M100Config(
        vocab_size=len(tok),
        d_model=_WIDTH,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=4 * _WIDTH,
        decoder_ffn_dim=4 * _WIDTH,
        max_position_embeddings=128,
        pad_token_id=pad,
        eos_token_id=eos,
        bos_token_id=eos,
        decoder_start_token_id=eos,
        dropout=0.0,
    )
    model = M2M100ForConditionalGeneration(cfg)
    # Both directions: (source, target, target language).
    data = [(en, de, "de") for en, de in pairs] + [(de, en, "en") for en, de in pairs]
    random.Random(seed).shuffle(data)

    def batch(step: int) -> dict[str, torch.Tensor]:
        picked = _batches(data, 16, step)
        enc = tok([src for src, _, _ in picked], return_tensors="pt", padding=True)
        enc.pop("token_type_ids", None)
        targets = [[lang[code], *tok(tgt)["input_ids"]] for _, tgt, code in picked]
        width = max(len(t) for t in targets)
        labels = torch.tensor([t + [-100] * (width - len(t)) for t in targets])
        return {**enc, "labels": labels}

    loss = _train(model, steps, batch)
    _save(model, tok, out)
    return loss


def _save(model: PreTrainedModel, tok: PreTrainedTokenizerFast, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)


BUILDERS: dict[str, Callable[[Path], float]] = {
    "tiny-gpt2": build_gpt2,
    "tiny-bert": build_bert,
    "tiny-sentiment": build_sentiment,
    "tiny-marian-en-de": build_marian,
    "tiny-m2m": build_m2m,
}


COMPLETE = ".complete"


def recipe() -> str:
    """What a build depends on: this module, the shipped data and the libraries that train and save."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    for name in ("corpus.txt", "sentiment.tsv", "en_de.tsv"):
        h.update(_data(name).encode())
    h.update(f"{torch.__version__} {transformers.__version__} {tokenizers.__version__}".encode())
    return h.hexdigest()[:16]


def _built(out: Path, want: str) -> bool:
    try:
        return bool(json.loads((out / COMPLETE).read_text()).get("recipe") == want)
    except (OSError, ValueError):
        return False


def build_all(root: Path, names: Iterable[str] = NAMES, force: bool = False) -> dict[str, Any]:
    """Build each named tiny model under ``root`` (skipping ones built by this recipe unless ``force``).

    Each model is built in a scratch directory and renamed into place with a completion marker, under
    a file lock: concurrent builders (parallel test sessions, an init container racing a worker) wait
    for each other, and a build killed halfway leaves nothing that looks finished.
    """
    report: dict[str, Any] = {}
    want = recipe()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name in names:
            out = root / name
            if not force and _built(out, want):
                report[name] = {"skipped": True}
                continue
            started = time.perf_counter()
            scratch = root / f".{name}.building"
            shutil.rmtree(scratch, ignore_errors=True)
            loss = BUILDERS[name](scratch)
            (scratch / COMPLETE).write_text(json.dumps({"final_loss": loss, "recipe": want}))
            shutil.rmtree(out, ignore_errors=True)
            scratch.rename(out)
            report[name] = {"seconds": round(time.perf_counter() - started, 2), "final_loss": round(loss, 4)}
            log.info("built %s in %.1fs (loss %.3f)", name, report[name]["seconds"], loss)
    (root / "tiny-models.json").write_text(json.dumps(report, indent=2))
    return report
