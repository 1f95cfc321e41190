"""generate: continue a prompt with a causal LM, KV cache on, through the continuous-batching engine.

Parameters a job leaves unset take the model's ``generation_config``, then transformers' defaults,
so a job answers as ``model.generate`` would. Example job::

    {"task": "generate", "model": "tiny-gpt2", "prompt": "The weather today", "max_new_tokens": 16}
"""

from __future__ import annotations

import copy
import functools
import json
import threading
from collections.abc import Sequence
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList

from queueformer.contract.errors import InputTooLong, InvalidInput, NoChatTemplate
from queueformer.contract.jobs import GenerateJob, Task
from queueformer.contract.records import GenerateResult, Generation, TokenLogprob, TopLogprob, Usage
from workers.engine.constraint import ConstraintSpec, Grammar, Grammars
from workers.engine.decode import GenOutput, GenRequest
from workers.engine.padding import pad_token_id
from workers.engine.penalties import openai_penalties
from workers.engine.processors import Scored, eos_ids, resolve
from workers.handlers.base import Handler

CONFIG_CACHE = 1024  # resolved generation configs kept per model (distinct sets of decoding fields)

# GenerateJob fields that are GenerationConfig fields of the same name and meaning.
GENERATION_FIELDS = (
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "min_p",
    "num_beams",
    "num_return_sequences",
    "repetition_penalty",
    "min_new_tokens",
    "no_repeat_ngram_size",
    "length_penalty",
    "early_stopping",
    "bad_words_ids",
    "suppress_tokens",
    "sequence_bias",
    "eos_token_id",
    "num_beam_groups",
    "diversity_penalty",
    "max_time",
)


class GenerateHandler(Handler[GenerateJob, GenRequest]):
    """Causal LM generation."""

    task = Task.GENERATE
    batching = "decode"

    def generation_config(self, job: GenerateJob) -> tuple[GenerationConfig, tuple[str, ...]]:
        """The job's decoding fields over the model's generation config, as ``model.generate`` merges them,
        and the stop strings that config names (taken out of it: the engine cuts at them itself).

        Resolved once per distinct set of fields: lines of a bulk file repeat them, and each merge
        deep-copies the model's config (preprocessing a long-tail line took 0.40 ms with a merge per
        line, 0.28 ms without, all of it holding the GIL the decode thread needs). The config is shared
        between requests, so nothing may change it (``hf_generate`` and ``row_decoding`` change copies).
        """
        fields = {name: getattr(job, name) for name in GENERATION_FIELDS}
        if fields["sequence_bias"] is not None:
            fields["sequence_bias"] = [[list(ids), bias] for ids, bias in fields["sequence_bias"]]
        if fields["eos_token_id"] is None and self.model.generation_config.eos_token_id is None:
            fields["eos_token_id"] = self.tokenizer.eos_token_id
        if job.ignore_eos:
            fields["eos_token_id"] = []  # EOS may be generated but does not end the sequence
        key = json.dumps(fields, sort_keys=True, default=repr)
        configs, lock = self._configs
        with lock:
            cached = configs.get(key)
        if cached is None:
            config = resolve(self.model, fields, pad_token_id(self.tokenizer, self.model.config))
            stop = tuple(_as_list(config.stop_strings))
            config.stop_strings = None
            cached = (config, stop)
            with lock:
                if len(configs) >= CONFIG_CACHE:
                    configs.pop(next(iter(configs)))  # the oldest
                configs[key] = cached
        return cached

    @functools.cached_property
    def _configs(self) -> tuple[dict[str, tuple[GenerationConfig, tuple[str, ...]]], threading.Lock]:
        return {}, threading.Lock()

    def eos_ids(self) -> frozenset[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return frozenset()
        return frozenset(eos if isinstance(eos, list) else [eos])

    def preprocess(self, job: GenerateJob) -> GenRequest:
        config, model_stop = self.generation_config(job)
        do_sample, num_beams = bool(config.do_sample), int(config.num_beams or 1)
        if job.num_return_sequences > 1 and not do_sample and num_beams < job.num_return_sequences:
            raise InvalidInput(
                "num_return_sequences > 1 needs do_sample=true or num_beams >= num_return_sequences",
                param="num_return_sequences",
            )
        if num_beams > 1 and (job.logprobs or job.prompt_logprobs):
            raise InvalidInput(
                "log-probabilities are not available with beam search (num_beams > 1)",
                param="logprobs" if job.logprobs else "prompt_logprobs",
            )
        # Stop strings of the model's generation config stop every path, cut at the stop like the job's.
        stop = tuple(dict.fromkeys([*job.stop, *model_stop]))
        if job.messages is not None:
            ids = self.chat_ids(job)
        else:
            ids = self.encode(job.prompt, truncate=job.truncate, reserve=job.max_new_tokens, keep="right")
        if not ids:
            bos = self.model.generation_config.bos_token_id or self.tokenizer.bos_token_id
            if bos is None:
                raise InvalidInput("prompt is empty and the model has no start token", param="prompt")
            ids = [int(bos)]
        return GenRequest(
            input_ids=tuple(ids),
            max_new_tokens=job.max_new_tokens,
            generation=config,
            stop=stop,
            eos=eos_ids(config),
            seed=job.seed,
            logprobs=job.top_logprobs if job.logprobs else None,
            prompt_logprobs=job.prompt_logprobs,
            constraint=self.constraint(job, num_beams),
            logits_processors=openai_penalties(job.presence_penalty, job.frequency_penalty, len(ids)),
        )

    def constraint(self, job: GenerateJob, num_beams: int) -> Grammar | None:
        """The compiled grammar of the job's structured-output field; a spec the grammar refuses is a 422."""
        spec = ConstraintSpec.of_job(job)
        if spec is None:
            return None
        if num_beams > 1:  # the model's generation config may ask for beams the job did not
            raise InvalidInput(f"{spec.field_name} cannot be combined with num_beams > 1", param="num_beams")
        return self.grammars.compile(spec)

    @functools.cached_property
    def grammars(self) -> Grammars:
        """Structured output for this model: specs compile on first use against its tokenizer, once each."""
        width = int(self.model.config.get_text_config().vocab_size)
        return Grammars(self.tokenizer, width=width, stop_ids=self.eos_ids())

    def chat_ids(self, job: GenerateJob) -> list[int]:
        """Token ids of a chat through the tokenizer's chat template, ready for the assistant's turn."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise NoChatTemplate(f"{self.entry.name} has no chat template; send a prompt instead", param="messages")
        turns = [m.model_dump(exclude_none=True) for m in job.messages or []]
        encoded = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
        ids = list(encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded)
        cap = self.max_input_tokens() - job.max_new_tokens
        if len(ids) > cap:
            if not job.truncate:
                raise InputTooLong(f"chat is {len(ids)} tokens; {self.entry.name} accepts {cap} here", param="messages")
            ids = ids[-cap:]
        return [int(i) for i in ids]

    def size(self, item: GenRequest) -> int:
        return len(item.input_ids) + item.max_new_tokens

    def forward(self, batch: Sequence[GenRequest]) -> list[Any]:
        """``model.generate`` per request: the path beam search takes, and the engine-free reference."""
        return [self.hf_generate(req) for req in batch]

    def hf_generate(self, req: GenRequest) -> list[GenOutput]:
        if req.constraint is not None:
            raise InvalidInput("structured output runs in the decode engine only", param=req.constraint.spec.field_name)
        if req.logprobs is not None or req.prompt_logprobs:
            raise InvalidInput("log-probabilities are computed in the decode engine only", param="logprobs")
        ids = torch.tensor([req.input_ids], dtype=torch.long, device=self.device)
        config = copy.deepcopy(req.generation)
        config.max_new_tokens = req.max_new_tokens
        config.max_length = None  # max_new_tokens decides, without generate's warning about both
        kwargs: dict[str, Any] = {"generation_config": config, "use_cache": True}
        if req.logits_processors:
            kwargs["logits_processor"] = LogitsProcessorList(req.logits_processors)
        if req.do_sample and req.seed is not None:
            torch.manual_seed(req.seed)
        if req.stop:
            config.stop_strings = list(req.stop)
            kwargs["tokenizer"] = self.tokenizer
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        results = []
        for row in out[:, ids.shape[1] :].tolist():
            tokens = list(row)
            # generate pads rows that finished early; a row ends at its first EOS
            for i, tok in enumerate(tokens):
                if tok in req.eos:
                    tokens = tokens[: i + 1]
                    break
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            hits = [text.find(s) for s in req.stop if s in text]
            reason = "stop" if (tokens and tokens[-1] in req.eos) or hits else "length"
            results.append(GenOutput(tokens, reason, min(hits) if hits else None))
        return results

    def postprocess(self, item: GenRequest, raw: list[GenOutput]) -> GenerateResult:
        generations = []
        for i, out in enumerate(raw):
            text = self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
            if out.stop_index is not None:
                text = text[: out.stop_index]
            logprobs = None if out.logprobs is None else self.token_logprobs(out.token_ids, out.logprobs)
            generations.append(
                Generation(
                    index=i, text=text, token_ids=out.token_ids, finish_reason=out.finish_reason, logprobs=logprobs
                )
            )
        completion = sum(len(o.token_ids) for o in raw)
        prompt = raw[0].prompt_logprobs if raw else None
        return GenerateResult(
            model=self.entry.name,
            generations=generations,
            prompt_logprobs=None if prompt is None else self.token_logprobs(list(item.input_ids), prompt),
            usage=Usage(prompt_tokens=len(item.input_ids), completion_tokens=completion),
        )

    def token_logprobs(self, tokens: Sequence[int], scored: Sequence[Scored | None]) -> list[TokenLogprob]:
        """Scores as the result's entries; each token's text is its own decode (specials included)."""
        text = self._token_text
        return [
            TokenLogprob(
                token_id=tok,
                token=text(tok),
                logprob=None if sc is None else sc.logprob,
                top_logprobs=[]
                if sc is None
                else [TopLogprob(token_id=t, token=text(t), logprob=v) for t, v in sc.top],
            )
            for tok, sc in zip(tokens, scored, strict=True)
        ]

    @functools.lru_cache(maxsize=65_536)  # noqa: B019 - one handler per loaded model, kept for its lifetime
    def _token_text(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id]))


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)
