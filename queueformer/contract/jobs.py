"""The job contract: one pydantic model per job type, joined in a union discriminated on ``task``.

Field definitions carry hard caps (they appear in the OpenAPI schema); ``_limit`` validators add the
operator's configurable caps from :mod:`queueformer.contract.limits`, so a violation names its field. Generation
parameters left as ``None`` take the model's ``generation_config`` value, else transformers' default,
exactly as ``model.generate`` would.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

from queueformer.contract import limits
from queueformer.contract.errors import InputTooLong
from queueformer.contract.priority import Priority

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$"
_HARD_TEXT_CHARS = 1_000_000


class Task(StrEnum):
    """The job types a worker can run; each one has one handler."""

    GENERATE = "generate"
    FILL_MASK = "fill-mask"
    TRANSLATE = "translate"
    CLASSIFY = "classify"
    FINE_TUNE = "fine-tune"
    EMBED = "embed"
    ECHO = "echo"


def _check_text(value: str) -> str:
    cap = limits.active().max_prompt_chars
    if len(value) > cap:
        raise ValueError(f"text is {len(value)} characters; the limit is {cap} (limits.max_prompt_chars)")
    if "\x00" in value:
        raise ValueError("text contains a NUL character")
    return value


# JSON Schema keyword that bounds each kind of value a configurable limit caps.
_BOUND = {
    "integer": "maximum",
    "number": "maximum",
    "array": "maxItems",
    "object": "maxProperties",
    "string": "maxLength",
}


@dataclass(frozen=True)
class _Limit:
    """Caps a number (or a list's, dict's or string's length) at ``limits.active().<name>``, read when a value is
    validated; the OpenAPI document states the same cap, read when the document is generated (after the
    process installed its limits), so requests the schema allows are the requests that are accepted."""

    name: str

    def check(self, value: Any) -> Any:
        if value is None:
            return value
        size = len(value) if isinstance(value, list | dict | str) else value
        cap = getattr(limits.active(), self.name)
        if size > cap:
            raise ValueError(f"{size} is above the limit of {cap} (limits.{self.name})")
        return value

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        json_schema = handler(schema)
        _cap(handler.resolve_ref_schema(json_schema), getattr(limits.active(), self.name))
        return json_schema


def _cap(json_schema: dict[str, Any], cap: float) -> None:
    for member in json_schema.get("anyOf", [json_schema]):
        bound = _BOUND.get(member.get("type", ""))
        if bound is not None:
            member[bound] = min(member.get(bound, cap), cap)


def _limit(name: str) -> _Limit:
    return _Limit(name)


@dataclass(frozen=True)
class _TextRules:
    """Text: at most ``limits.max_prompt_chars`` characters and no NUL, in validation and in the schema."""

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_after_validator_function(_check_text, handler(source))

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        json_schema = handler(schema)
        _cap(json_schema, limits.active().max_prompt_chars)
        json_schema["pattern"] = "^[^\\u0000]*$"
        return json_schema


ModelName = Annotated[str, Field(pattern=MODEL_NAME_PATTERN, description="A served model name from the registry.")]
Text = Annotated[str, Field(max_length=_HARD_TEXT_CHARS), _TextRules()]
Metadata = Annotated[
    dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
    _limit("max_metadata_pairs"),
    Field(description="Free-form string pairs kept with the job."),
]
StopString = Annotated[str, Field(min_length=1, max_length=1024), _limit("max_stop_chars")]
# transformers 5 moved diverse beam search out of generate into Hub code (custom_generate), which workers never run.
GROUP_BEAM_SEARCH_GONE = (
    "diverse beam search (num_beam_groups > 1, diversity_penalty > 0) is not available: transformers' generate "
    "no longer includes it"
)
TokenId = Annotated[int, Field(ge=0, lt=2**31)]
TokenSequence = Annotated[list[TokenId], Field(min_length=1, max_length=64)]


def _task_required(schema: dict[str, Any]) -> None:
    # The union of job types is discriminated on ``task``: a body must name it (the default serves Python callers).
    schema["required"] = ["task", *[name for name in schema.get("required", []) if name != "task"]]


class JobBase(BaseModel):
    """What every job type shares; each type adds its fields and its token estimate."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_task_required)

    task: str
    model: ModelName
    metadata: Metadata = Field(default_factory=dict)
    timeout_s: int | None = Field(
        None,
        ge=1,
        le=7 * 24 * 3600,
        description="Seconds from submission after which the job fails (deadline_exceeded).",
    )
    priority: Priority | None = None

    def estimated_tokens(self) -> int:
        """A cheap token estimate for quotas (about 4 characters per token, plus tokens to generate)."""
        raise NotImplementedError(f"{type(self).__name__} declares no token estimate")


class ChatTurn(BaseModel):
    """One chat message; a model's chat template turns a list of them into its prompt."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text
    name: str | None = Field(None, max_length=64)


class JsonSchemaFormat(BaseModel):
    """OpenAI's ``response_format.json_schema``: a named schema; ``strict`` enforces it exactly."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True, serialize_by_alias=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = Field(None, max_length=4096)
    schema_: dict[str, Any] = Field(alias="schema", description="The JSON schema the output must validate against.")
    strict: bool | None = Field(
        False,
        description="true: every keyword is enforced, and a schema using one the grammar cannot enforce is refused; "
        "false: enforced as far as the grammar can, other keywords ignored.",
    )


def _response_format_rules(schema: dict[str, Any]) -> None:
    """``json_schema`` is given exactly when ``type`` is ``json_schema`` (see the validator)."""
    schema_type = {"properties": {"type": {"const": "json_schema"}}}
    no_schema = {"anyOf": [{"not": {"required": ["json_schema"]}}, {"properties": {"json_schema": {"type": "null"}}}]}
    stray_schema = {
        "required": ["json_schema"],
        "properties": {"type": {"not": {"const": "json_schema"}}, "json_schema": {"not": {"type": "null"}}},
    }
    schema["not"] = {"anyOf": [{"allOf": [schema_type, no_schema]}, stray_schema]}


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: free text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_response_format_rules)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given exactly when type is json_schema")
        return self


# Output constraints of a generate job: at most one of these fields.
CONSTRAINT_FIELDS = ("json_schema", "regex", "choice", "response_format")


def _generate_rules(schema: dict[str, Any]) -> None:
    """The rules between fields that the validators below enforce, stated in the schema as combinations that
    are refused; so are ``num_return_sequences`` values that need sampling or as many beams."""
    refused: list[dict[str, Any]] = [
        {"required": ["prompt", "messages"], "properties": {"prompt": {"minLength": 1}, "messages": {"type": "array"}}},
        {
            "required": ["ignore_eos", "num_beams"],
            "properties": {"ignore_eos": {"const": True}, "num_beams": {"minimum": 2}},
        },
        {
            "required": ["top_logprobs"],
            "properties": {"top_logprobs": {"minimum": 1}, "logprobs": {"not": {"const": True}}},
        },
        # group beam search is gone from generate: only its neutral values pass
        {"required": ["num_beam_groups"], "properties": {"num_beam_groups": {"not": {"enum": [None, 1]}}}},
        {"required": ["diversity_penalty"], "properties": {"diversity_penalty": {"not": {"enum": [None, 0, 1]}}}},
    ]
    # at most one output constraint, and none with beam search (a text response_format constrains nothing)
    given = {"not": {"type": "null"}}
    for i, a in enumerate(CONSTRAINT_FIELDS):
        refused += [{"required": [a, b], "properties": {a: given, b: given}} for b in CONSTRAINT_FIELDS[i + 1 :]]
    binding = {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["json_object", "json_schema"]}}}
    for name in CONSTRAINT_FIELDS:
        shape = binding if name == "response_format" else given
        refused.append({"required": [name, "num_beams"], "properties": {name: shape, "num_beams": {"minimum": 2}}})
    schema["not"] = {"anyOf": refused + _return_sequence_rules()}
    _task_required(schema)


def _return_sequence_rules() -> list[dict[str, Any]]:
    """``num_return_sequences`` values refused without sampling or as many beams, as combinations."""
    refused = []
    for n in range(2, limits.active().max_return_sequences + 1):
        beams = {"anyOf": [{"type": "null"}, {"type": "integer", "maximum": n - 1}]}
        sampling = {"not": {"const": True}}
        refused.append(
            {
                "required": ["num_return_sequences"],
                "properties": {"num_return_sequences": {"const": n}, "do_sample": sampling, "num_beams": beams},
            }
        )
    return refused


def _translate_rules(schema: dict[str, Any]) -> None:
    """A language is named one way at a time; return sequences need sampling or beams (see the validator)."""
    given = {"not": {"type": "null"}}
    both: dict[str, Any] = {
        "required": ["target_language", "forced_bos_token_id"],
        "properties": {"target_language": given, "forced_bos_token_id": given},
    }
    schema["not"] = {"anyOf": [both, *_return_sequence_rules()]}
    _task_required(schema)


class GenerateJob(JobBase):
    """Continue a prompt (or a chat, through the model's chat template) with a causal LM and the KV cache."""

    model_config = ConfigDict(json_schema_extra=_generate_rules)

    task: Literal["generate"] = "generate"
    prompt: Text = ""
    messages: Annotated[list[ChatTurn], Field(min_length=1, max_length=1024)] | None = Field(
        None, description="Chat turns instead of a prompt; needs a model with a chat template."
    )
    max_new_tokens: Annotated[int, Field(ge=1, le=32_768), _limit("max_new_tokens")] = 32
    do_sample: bool | None = None
    temperature: float | None = Field(None, gt=0, le=100)
    top_k: Annotated[int | None, Field(ge=0, le=100_000), _limit("max_top_k")] = None
    top_p: float | None = Field(None, gt=0, le=1)
    num_beams: Annotated[int | None, Field(ge=1, le=64), _limit("max_num_beams")] = None
    num_return_sequences: Annotated[int, Field(ge=1, le=64), _limit("max_return_sequences")] = 1
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    stop: Annotated[list[StopString], Field(max_length=32), _limit("max_stop_sequences")] = Field(default_factory=list)
    # 2**53 - 1: the largest integer every JSON reader keeps exactly
    seed: int | None = Field(None, ge=0, le=2**53 - 1)
    # transformers' GenerationConfig fields, with its meaning; None takes the model's generation config.
    min_new_tokens: int | None = Field(None, ge=0, le=32_768, description="EOS is suppressed until this many tokens.")
    no_repeat_ngram_size: int | None = Field(None, ge=0, le=1024, description="No n-gram of this size occurs twice.")
    length_penalty: float | None = Field(None, ge=-100, le=100, description="Beam search: exponent on the length.")
    early_stopping: bool | Literal["never"] | None = Field(None, description="Beam search: when to stop searching.")
    bad_words_ids: Annotated[list[TokenSequence], Field(min_length=1, max_length=1024)] | None = Field(
        None, description="Token sequences that are never generated."
    )
    suppress_tokens: Annotated[list[TokenId], Field(min_length=1, max_length=65_536)] | None = Field(
        None, description="Token ids that are never generated."
    )
    sequence_bias: Annotated[list[tuple[TokenSequence, float]], Field(min_length=1, max_length=1024)] | None = Field(
        None,
        description="[[token ids], bias] pairs: the bias goes to the last token's logit after the others.",
    )
    typical_p: float | None = Field(None, gt=0, le=1, description="Sampling: locally typical mass to keep.")
    min_p: float | None = Field(
        None, ge=0, le=1, description="Sampling: drop tokens under min_p x the top probability."
    )
    eos_token_id: TokenId | Annotated[list[TokenId], Field(max_length=64)] | None = Field(
        None, description="End-of-sequence token(s), instead of the model's."
    )
    num_beam_groups: int | None = Field(
        None, ge=1, le=64, description="Only 1 (diverse beam search is gone from generate)."
    )
    diversity_penalty: float | None = Field(None, ge=0, le=100, description="Only 0: needs num_beam_groups > 1.")
    max_time: float | None = Field(None, gt=0, le=7 * 24 * 3600, description="Seconds of decoding before it stops.")
    logprobs: bool = Field(False, description="Return each generated token's log-probability.")
    top_logprobs: int = Field(0, ge=0, le=20, description="With logprobs: this many most likely tokens per position.")
    prompt_logprobs: bool = Field(False, description="Return the prompt tokens' log-probabilities too (echo).")
    presence_penalty: float = Field(
        0.0, ge=-2, le=2, description="OpenAI's: subtracted from the logit of every token already generated."
    )
    frequency_penalty: float = Field(
        0.0, ge=-2, le=2, description="OpenAI's: subtracted once per earlier occurrence of a token in the output."
    )
    json_schema: dict[str, Any] | None = Field(
        None, description="The output must be JSON valid against this schema (enforced token by token)."
    )
    regex: str | None = Field(None, min_length=1, max_length=4096, description="The output must match this regex.")
    choice: (
        Annotated[list[Annotated[str, Field(min_length=1, max_length=1024)]], Field(min_length=1, max_length=256)]
        | None
    ) = Field(None, description="The output must be exactly one of these strings.")
    response_format: ResponseFormat | None = Field(
        None, description="OpenAI's response_format: text, json_object, or json_schema with strict."
    )
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token (benchmarks).")
    truncate: bool = Field(False, description="Drop the oldest prompt tokens instead of failing when too long.")
    stream: bool = Field(False, description="Publish tokens to the job's event stream as they are generated.")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("ignore_eos")
    @classmethod
    def _ignore_eos_without_beams(cls, value: bool, info: ValidationInfo) -> bool:
        # Beam search ends hypotheses at EOS; transformers has no way to keep beams going past it.
        if value and (info.data.get("num_beams") or 1) > 1:
            raise ValueError("ignore_eos is not supported with beam search (num_beams > 1)")
        return value

    @field_validator("num_beam_groups", "diversity_penalty")
    @classmethod
    def _no_group_beam_search(cls, value: float | None) -> float | None:
        if value not in (None, 0, 1):
            raise ValueError(GROUP_BEAM_SEARCH_GONE)
        return value

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> GenerateJob:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> GenerateJob:
        if self.messages is not None and self.prompt:
            raise ValueError("give either prompt or messages, not both")
        return self

    @property
    def constrained(self) -> str | None:
        """The field that constrains the output, if any (``response_format`` of type text does not)."""
        for name in CONSTRAINT_FIELDS:
            value = getattr(self, name)
            if value is not None and not (isinstance(value, ResponseFormat) and value.type == "text"):
                return name
        return None

    @model_validator(mode="after")
    def _one_constraint(self) -> GenerateJob:
        given = [n for n in CONSTRAINT_FIELDS if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of {', '.join(CONSTRAINT_FIELDS)}; got {', '.join(given)}")
        if self.constrained and (self.num_beams or 1) > 1:
            raise ValueError(f"{self.constrained} cannot be combined with num_beams > 1")
        return self

    @model_validator(mode="after")
    def _return_sequences_need_search(self) -> GenerateJob:
        if (
            self.num_return_sequences > 1
            and self.do_sample is not True
            and (self.num_beams or 1) < self.num_return_sequences
        ):
            raise ValueError("num_return_sequences > 1 needs do_sample=true or num_beams >= num_return_sequences")
        return self

    def estimated_tokens(self) -> int:
        chars = len(self.prompt) + sum(len(m.content) for m in self.messages or [])
        return chars // 4 + 1 + self.max_new_tokens * self.num_return_sequences


class FillMaskJob(JobBase):
    """Predict the masked tokens of a text (the fill-mask pipeline's output shape)."""

    task: Literal["fill-mask"] = "fill-mask"
    text: Text = Field(description="Text with one or more mask tokens, e.g. [MASK].")
    top_k: Annotated[int, Field(ge=1, le=100_000), _limit("max_top_k")] = 5
    targets: (
        Annotated[str, Field(min_length=1, max_length=256)]
        | Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]], Field(min_length=1, max_length=1024)]
        | None
    ) = Field(
        None,
        description="Score only these words (the fill-mask pipeline's targets); a word that is not one token "
        "stands for its first token.",
    )
    truncate: bool = False

    def estimated_tokens(self) -> int:
        return len(self.text) // 4 + 1


class TranslateJob(JobBase):
    """Translate a text with a seq2seq model's ``generate``, with generate's decoding knobs.

    Unset knobs take the model's ``generation_config``, as ``model.generate`` would. Many-to-many
    models (M2M100, NLLB, mBART-50) are pointed at a language with ``target_language`` (a language
    code the tokenizer knows: ``de``, ``fra_Latn``, ``fr_XX``) or directly with ``forced_bos_token_id``.
    """

    model_config = ConfigDict(json_schema_extra=_translate_rules)

    task: Literal["translate"] = "translate"
    text: Text
    max_new_tokens: Annotated[int, Field(ge=1, le=32_768), _limit("max_new_tokens")] = 128
    num_beams: Annotated[int | None, Field(ge=1, le=64), _limit("max_num_beams")] = None
    do_sample: bool | None = None
    temperature: float | None = Field(None, gt=0, le=100)
    top_k: Annotated[int | None, Field(ge=0, le=100_000), _limit("max_top_k")] = None
    top_p: float | None = Field(None, gt=0, le=1)
    num_return_sequences: Annotated[int, Field(ge=1, le=64), _limit("max_return_sequences")] = 1
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    no_repeat_ngram_size: int | None = Field(None, ge=0, le=1024)
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="OpenAI's presence penalty on the output.")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="OpenAI's frequency penalty on the output.")
    stop: Annotated[list[StopString], Field(max_length=32), _limit("max_stop_sequences")] = Field(default_factory=list)
    seed: int | None = Field(None, ge=0, le=2**53 - 1)  # the largest integer every JSON reader keeps exactly
    target_language: str | None = Field(
        None, min_length=1, max_length=32, description="Language code to translate into (many-to-many models)."
    )
    forced_bos_token_id: int | None = Field(
        None, ge=0, lt=2**31, description="Token forced first in the output (a language token); or target_language."
    )
    truncate: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _checks(self) -> TranslateJob:
        if self.target_language is not None and self.forced_bos_token_id is not None:
            raise ValueError("give either target_language or forced_bos_token_id, not both")
        if (
            self.num_return_sequences > 1
            and self.do_sample is not True
            and (self.num_beams or 1) < self.num_return_sequences
        ):
            raise ValueError("num_return_sequences > 1 needs do_sample=true or num_beams >= num_return_sequences")
        return self

    def estimated_tokens(self) -> int:
        return len(self.text) // 4 + 1 + self.max_new_tokens * self.num_return_sequences


def _classify_rules(schema: dict[str, Any]) -> None:
    """``text_pair`` has ``text``'s shape (a string with a string, a list with a list), as the validator holds."""
    schema["not"] = {
        "anyOf": [
            {"required": ["text", "text_pair"], "properties": {"text": {"type": t}, "text_pair": {"type": p}}}
            for t, p in (("string", "array"), ("array", "string"))
        ]
    }
    _task_required(schema)


class ClassifyJob(JobBase):
    """Score one text or a list of texts against a sequence classifier's labels."""

    model_config = ConfigDict(json_schema_extra=_classify_rules)

    task: Literal["classify"] = "classify"
    text: Text | Annotated[list[Text], Field(min_length=1, max_length=10_000), _limit("max_texts_per_job")]
    text_pair: (
        Text | Annotated[list[Text], Field(min_length=1, max_length=10_000), _limit("max_texts_per_job")] | None
    ) = Field(None, description="Second text of each pair (NLI, paraphrase): a string for a string, a list for a list.")
    top_k: Annotated[int | None, Field(ge=1, le=100_000), _limit("max_top_k")] = Field(
        1, description="Labels to return per text, best first; null returns every label."
    )
    function_to_apply: Literal["default", "softmax", "sigmoid", "none"] = Field(
        "default",
        description="As the text-classification pipeline: default is sigmoid for multi-label or one-label models, "
        "softmax otherwise, none (raw logits) for regression.",
    )
    truncate: bool = False

    @model_validator(mode="after")
    def _pairs_match(self) -> ClassifyJob:
        if self.text_pair is None:
            return self
        if isinstance(self.text, str) != isinstance(self.text_pair, str):
            raise ValueError("text_pair is a string when text is one, and a list when text is one")
        if isinstance(self.text_pair, list) and len(self.text_pair) != len(self.texts):
            raise ValueError(f"text_pair has {len(self.text_pair)} entries for {len(self.texts)} texts")
        return self

    @property
    def texts(self) -> list[str]:
        return [self.text] if isinstance(self.text, str) else list(self.text)

    @property
    def pairs(self) -> list[str | None]:
        if self.text_pair is None:
            return [None] * len(self.texts)
        return [self.text_pair] if isinstance(self.text_pair, str) else list(self.text_pair)

    def estimated_tokens(self) -> int:
        return sum(len(t) + len(p or "") for t, p in zip(self.texts, self.pairs, strict=True)) // 4 + 1


TokenIds = Annotated[list[TokenId], Field(min_length=1, max_length=131_072)]


EmbedInput = (
    Text
    | Annotated[list[Text], Field(min_length=1, max_length=10_000), _limit("max_texts_per_job")]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1, max_length=10_000), _limit("max_texts_per_job")]
)


class EmbedJob(JobBase):
    """Embed texts (or token-id lists) as pooled hidden states of an encoder or decoder model."""

    task: Literal["embed"] = "embed"
    input: EmbedInput = Field(
        description="A text, a list of texts, or the model's own token ids (one list, or a list of lists)."
    )
    pooling: Literal["mean", "cls", "last"] = Field(
        "mean", description="mean over the tokens, the first token ([CLS]), or the last token (decoder models)."
    )
    normalize: bool = Field(True, description="Scale each vector to unit length (after any dimensions cut).")
    dimensions: int | None = Field(None, ge=1, le=65_536, description="Keep only the first N dimensions.")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="How OpenAI-shaped responses carry vectors: JSON floats or base64 little-endian float32."
    )
    truncate: bool = False

    @property
    def inputs(self) -> list[str | list[int]]:
        """One entry per vector: a text or a token-id list."""
        value = self.input
        if isinstance(value, str) or (value and isinstance(value[0], int)):
            return [value]
        return list(value)  # type: ignore[arg-type]

    def estimated_tokens(self) -> int:
        return sum(len(x) // 4 + 1 if isinstance(x, str) else len(x) for x in self.inputs)


class FineTuneMethod(StrEnum):
    FULL = "full"
    LORA = "lora"
    QLORA = "qlora"


class Hyperparameters(BaseModel):
    """Training knobs; the defaults train for one epoch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: Annotated[float | None, Field(gt=0, le=10_000), _limit("max_train_epochs")] = None
    max_steps: Annotated[int | None, Field(ge=1, le=10_000_000), _limit("max_train_steps")] = Field(
        None, description="Overrides epochs when set."
    )
    learning_rate: float = Field(5e-5, gt=0, le=1)
    batch_size: Annotated[int, Field(ge=1, le=65_536), _limit("max_train_batch_size")] = 8
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    block_size: Annotated[int, Field(ge=8, le=131_072), _limit("max_block_size")] = 128
    warmup_steps: int = Field(0, ge=0, le=1_000_000)
    weight_decay: float = Field(0.0, ge=0, le=1)
    seed: int = Field(42, ge=0, le=2**32 - 1)
    eval_split: float = Field(0.0, ge=0, lt=1, description="Fraction of blocks held out for eval loss and perplexity.")
    checkpoint_steps: int = Field(50, ge=1, le=1_000_000, description="Save a resumable checkpoint every N steps.")
    lora_r: int = Field(8, ge=1, le=1024)
    lora_alpha: int = Field(16, ge=1, le=4096)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_target_modules: list[Annotated[str, Field(max_length=64)]] | None = Field(None, max_length=64)


class FineTuneJob(JobBase):
    """Train a registered base model on a JSONL file and register the result as a new servable model."""

    task: Literal["fine-tune"] = "fine-tune"
    training_file: str = Field(
        max_length=1024,
        description="The id (file-...) of one of your uploaded files with purpose fine-tune, or a URI under a prefix "
        "the operator allows; JSONL lines with text or prompt/completion.",
    )
    method: FineTuneMethod = FineTuneMethod.LORA
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    suffix: str | None = Field(
        None, pattern=r"^[a-z0-9][a-z0-9-]{0,39}$", description="Goes into the new model's name."
    )

    def estimated_tokens(self) -> int:
        # The enqueued-token quota meters inference; training is bounded by the training limits instead.
        return 0


class EchoJob(JobBase):
    """Return the text unchanged: a canary that crosses the whole pipeline without touching a model."""

    task: Literal["echo"] = "echo"
    text: Text = ""

    def estimated_tokens(self) -> int:
        return len(self.text) // 4 + 1


def check_fits(spec: JobBase, max_input_tokens: int | None, param: str = "max_new_tokens") -> None:
    """Refuse, before it is queued, a job that can never fit its model's context window.

    A decoder's window holds the prompt and every new token, so ``max_new_tokens`` at or above the
    model's ``max_input_tokens`` leaves no room for even one prompt token (the worker would fail it the
    same way). How many tokens a prompt takes is only known to the worker's tokenizer: an overlong
    prompt fails there as ``input_too_long`` (or is cut, with ``truncate``).
    """
    if max_input_tokens and isinstance(spec, GenerateJob) and spec.max_new_tokens >= max_input_tokens:
        raise InputTooLong(
            f"max_new_tokens is {spec.max_new_tokens} but {spec.model} holds {max_input_tokens} tokens in all, "
            "prompt included",
            param=param,
        )
