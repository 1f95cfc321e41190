"""generate: continue a prompt with a causal LM, KV cache on, through the continuous-batching engine.

Parameters a job leaves unset take the model's ``generation_config``, then transformers' defaults,
so a job answers as ``model.generate`` would. Example job::

    {"task": "generate", "model": "tiny-gpt2", "prompt": "The weather today", "max_new_tokens": 16}
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from transformers import LogitsProcessorList

from queueformer.contract.errors import InputTooLong, InvalidInput, NoChatTemplate
from queueformer.contract.jobs import GenerateJob, Task
from queueformer.contract.records import GenerateResult, Generation, Usage
from workers.engine.constraint import ConstraintSpec, Grammar, Grammars
from workers.engine.decode import GenOutput, GenRequest
from workers.engine.penalties import openai_processors
from workers.handlers.base import Handler

_DEFAULTS = {
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "num_beams": 1,
}


class GenerateHandler(Handler[GenerateJob, GenRequest]):
    """Causal LM generation."""

    task = Task.GENERATE
    batching = "decode"

    def _param(self, job: GenerateJob, name: str) -> Any:
        value = getattr(job, name)
        if value is None:
            value = getattr(self.model.generation_config, name, None)
        return _DEFAULTS[name] if value is None else value

    def eos_ids(self) -> frozenset[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return frozenset()
        return frozenset(eos if isinstance(eos, list) else [eos])

    def preprocess(self, job: GenerateJob) -> GenRequest:
        do_sample = bool(self._param(job, "do_sample"))
        num_beams = int(self._param(job, "num_beams"))
        if job.num_return_sequences > 1 and not do_sample and num_beams < job.num_return_sequences:
            raise InvalidInput(
                "num_return_sequences > 1 needs do_sample=true or num_beams >= num_return_sequences",
                param="num_return_sequences",
            )
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
            do_sample=do_sample,
            temperature=float(self._param(job, "temperature")),
            top_k=int(self._param(job, "top_k")),
            top_p=float(self._param(job, "top_p")),
            repetition_penalty=float(self._param(job, "repetition_penalty")),
            num_beams=num_beams,
            num_return_sequences=job.num_return_sequences,
            stop=tuple(job.stop),
            eos=frozenset() if job.ignore_eos else self.eos_ids(),
            seed=job.seed,
            constraint=self.constraint(job, num_beams),
            logits_processors=self.openai_processors(job, len(ids)),
        )

    def constraint(self, job: GenerateJob, num_beams: int) -> Grammar | None:
        """The compiled grammar of the job's structured-output field; a spec the grammar refuses is a 422."""
        spec = ConstraintSpec.of_job(job)
        if spec is None:
            return None
        if num_beams > 1:  # the model's generation config may ask for beams the job did not
            raise InvalidInput(f"{spec.field_name} cannot be combined with num_beams > 1", param="num_beams")
        return self.grammars.compile(spec)

    def openai_processors(self, job: GenerateJob, prompt_len: int) -> tuple[Any, ...]:
        """Presence/frequency penalties and logit bias; bias ids outside the model's vocabulary are a 422."""
        width = int(self.model.config.get_text_config().vocab_size)
        bad = sorted(t for t in job.logit_bias if t >= width)
        if bad:
            raise InvalidInput(
                f"logit_bias names token ids {bad[:8]} outside the model's vocabulary of {width}", param="logit_bias"
            )
        return openai_processors(
            presence=job.presence_penalty,
            frequency=job.frequency_penalty,
            logit_bias=job.logit_bias,
            prompt_len=prompt_len,
        )

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
        ids = torch.tensor([req.input_ids], dtype=torch.long, device=self.device)
        kwargs: dict[str, Any] = {
            "max_new_tokens": req.max_new_tokens,
            "do_sample": req.do_sample,
            "num_beams": req.num_beams,
            "num_return_sequences": req.num_return_sequences,
            "repetition_penalty": req.repetition_penalty,
            "use_cache": True,
        }
        if req.do_sample:
            kwargs.update(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p)
            if req.seed is not None:
                torch.manual_seed(req.seed)
        if not req.eos:
            kwargs["eos_token_id"] = []  # ignore_eos: EOS may be generated but does not stop the sequence
        if req.stop:
            kwargs.update(stop_strings=list(req.stop), tokenizer=self.tokenizer)
        if req.logits_processors:
            kwargs["logits_processor"] = LogitsProcessorList(req.logits_processors)
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
            generations.append(Generation(index=i, text=text, token_ids=out.token_ids, finish_reason=out.finish_reason))
        completion = sum(len(o.token_ids) for o in raw)
        return GenerateResult(
            model=self.entry.name,
            generations=generations,
            usage=Usage(prompt_tokens=len(item.input_ids), completion_tokens=completion),
        )
