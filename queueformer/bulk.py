"""Bulk runs from a JSONL file: lines become batch requests, batches run, results come back in order.

A line is either an OpenAI batch line (``custom_id``/``method``/``url``/``body``) or a plain request
such as ``{"prompt": "..."}`` or ``{"task": "classify", "text": "..."}``, which gets the default
model and parameters from the command line. Files larger than one batch are split; results are
written in input order, one line per request, as they are collected: for a file of OpenAI batch
lines, OpenAI's batch output lines (``id``, ``custom_id``, ``response``, ``error``), failures
included; for plain lines, ``{"custom_id", "status": "ok", "response": <result>}`` or
``{"custom_id", "status": "error", "error": {"code", "message"}}``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from queueformer.client import Client
from queueformer.contract.errors import InvalidInput
from queueformer.contract.tasks import TASK_NAMES, spec_of


@dataclass
class BulkReport:
    requests: int = 0
    succeeded: int = 0
    failed: int = 0
    seconds: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    batches: list[str] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)  # error code -> failed requests
    examples: dict[str, str] = field(default_factory=dict)  # error code -> "custom_id: message" of the first
    rows: list[dict[str, Any]] = field(default_factory=list)  # one native row per request, in input order

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds else 0.0


def is_openai_line(obj: Any) -> bool:
    return isinstance(obj, dict) and "url" in obj and "body" in obj


def read_lines(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object is refused by number."""
    out: list[tuple[int, dict[str, Any]]] = []
    for n, raw in enumerate(path.read_text("utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidInput(
                f"{path} line {n} is not valid JSON ({exc.msg} at column {exc.colno}); "
                "every line must be one JSON object"
            ) from None
        if not isinstance(obj, dict):
            raise InvalidInput(f"{path} line {n} is not a JSON object; every line must be one")
        out.append((n, obj))
    return out


def to_batch_lines(
    path: Path, model: str | None, task: str, defaults: dict[str, Any]
) -> tuple[str, list[dict[str, Any]]]:
    """(endpoint, OpenAI batch lines) for an input file."""
    lines: list[dict[str, Any]] = []
    endpoint: str | None = None
    for n, obj in read_lines(path):
        if is_openai_line(obj):
            line = {"method": "POST", **obj}
            line.setdefault("custom_id", f"line-{n}")
        else:
            body = {**defaults, "task": obj.get("task", task), **{k: v for k, v in obj.items() if k != "custom_id"}}
            if model and "model" not in obj:
                body["model"] = model
            field = _text_field(body["task"])
            if "input" in body and field is not None and field not in body:
                body[field] = body.pop("input")
            line = {
                "custom_id": str(obj.get("custom_id", f"line-{n}")),
                "method": "POST",
                "url": "/v1/jobs",
                "body": body,
            }
        if endpoint is None:
            endpoint = line["url"]
        lines.append(line)
    return endpoint or "/v1/jobs", lines


def _text_field(task: Any) -> str | None:
    """The field a plain line's ``input`` fills for ``task`` (None for unknown tasks: the API names them)."""
    return spec_of(task).text_field if task in TASK_NAMES else None


def run(
    qf: Client,
    endpoint: str,
    lines: list[dict[str, Any]],
    out_path: Path,
    *,
    max_lines: int = 50_000,
    on_progress: Callable[[int, int], None] | None = None,
    openai_format: bool = False,
) -> BulkReport:
    """Submit ``lines`` as batches of at most ``max_lines``, wait, and write results in input order.

    ``openai_format``: write OpenAI's batch output lines (as the output and error files hold them)
    instead of the native rows.
    """
    report = BulkReport(requests=len(lines))
    started = time.perf_counter()
    submitted: list[str] = []
    for at in range(0, len(lines), max_lines):
        part = lines[at : at + max_lines]
        data = b"".join(json.dumps(x, ensure_ascii=False).encode() + b"\n" for x in part)
        file = qf.upload(data, purpose="batch", filename=f"{out_path.stem}-{at // max_lines}.jsonl")
        submitted.append(qf.create_batch(file["id"], endpoint)["id"])
    report.batches = submitted
    done: dict[str, int] = {}

    def progress(batch: dict[str, Any]) -> None:
        counts = batch["request_counts"]
        done[batch["id"]] = counts["completed"] + counts["failed"]
        if on_progress is not None:
            on_progress(sum(done.values()), len(lines))

    by_id: dict[str, dict[str, Any]] = {}
    raw: dict[str, dict[str, Any]] = {}
    for batch_id in submitted:
        batch = qf.wait_batch(batch_id, on_progress=progress)
        outputs, errors = qf.batch_results(batch)
        for o in outputs:
            body = o["response"]["body"]
            if o["response"].get("status_code", 200) < 400:
                by_id[o["custom_id"]] = {"custom_id": o["custom_id"], "status": "ok", "response": body}
            else:
                by_id[o["custom_id"]] = {"custom_id": o["custom_id"], "status": "error", "error": _error_of(o)}
            raw[o["custom_id"]] = o
        for e in errors:
            by_id.setdefault(e["custom_id"], {"custom_id": e["custom_id"], "status": "error", "error": _error_of(e)})
            raw.setdefault(e["custom_id"], e)
        usage = batch.get("usage") or {}
        report.input_tokens += usage.get("input_tokens", 0)
        report.output_tokens += usage.get("output_tokens", 0)
    report.seconds = time.perf_counter() - started
    with out_path.open("w", encoding="utf-8") as out:
        for line in lines:
            cid = line["custom_id"]
            missing = {"code": "missing", "message": "the batch returned no line for this request"}
            row = by_id.get(cid, {"custom_id": cid, "status": "error", "error": missing})
            report.rows.append(row)
            if row["status"] == "ok":
                report.succeeded += 1
            else:
                report.failed += 1
                code = str(row["error"].get("code") or "unknown")
                report.failures[code] += 1
                report.examples.setdefault(code, f"{cid}: {row['error'].get('message', '')}")
            if openai_format:
                written = raw.get(cid, {"id": None, "custom_id": cid, "response": None, "error": missing})
            else:
                written = row
            out.write(json.dumps(written, ensure_ascii=False) + "\n")
    return report


def _error_of(line: dict[str, Any]) -> dict[str, Any]:
    if line.get("error"):
        return dict(line["error"])
    body = (line.get("response") or {}).get("body") or {}
    return dict(body.get("error") or {"code": "unknown"})


def summary_text(row: dict[str, Any]) -> str:
    """A one-line human view of a result row (for the demo and `run --show`)."""
    if row["status"] != "ok":
        return f"error {row['error'].get('code')}: {row['error'].get('message', '')}"
    body = row["response"]
    if "generations" in body:
        return str(body["generations"][0]["text"])
    if "choices" in body:
        choice = body["choices"][0]
        return str(choice.get("text") or choice.get("message", {}).get("content", ""))
    if "translation" in body:
        return str(body["translation"]["text"])
    if "labels" in body:
        return ", ".join(f"{ls['label']} {ls['score']:.3f}" for ls in body["labels"][0])
    if "masks" in body:
        return " | ".join(c["token_str"] for c in body["masks"][0])
    return json.dumps(body)[:200]
