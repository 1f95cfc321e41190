"""fill-mask: top-k candidates for every mask token, in the fill-mask pipeline's shape.

Example job::

    {"task": "fill-mask", "model": "tiny-bert", "text": "The cat sleeps on the warm [MASK].", "top_k": 3}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from queueformer.contract.errors import InvalidInput, NoMaskToken
from queueformer.contract.jobs import FillMaskJob, Task
from queueformer.contract.records import FillMaskResult, MaskCandidate, Usage
from workers.engine.padding import pad_right, pad_token_id
from workers.handlers.base import Handler


@dataclass(frozen=True)
class MaskInput:
    input_ids: tuple[int, ...]
    mask_positions: tuple[int, ...]
    top_k: int
    target_ids: tuple[int, ...] | None = None  # score only these tokens (the pipeline's ``targets``)


class FillMaskHandler(Handler[FillMaskJob, MaskInput]):
    """Masked-LM candidates."""

    task = Task.FILL_MASK

    def preprocess(self, job: FillMaskJob) -> MaskInput:
        mask_id = self.tokenizer.mask_token_id
        if mask_id is None:
            raise NoMaskToken(f"{self.entry.name} has no mask token", param="model")
        ids = self.encode(job.text, truncate=job.truncate, keep="left")
        positions = tuple(i for i, t in enumerate(ids) if t == mask_id)
        if not positions:
            raise NoMaskToken(
                f"no mask token {self.tokenizer.mask_token} found in the text (after truncation)", param="text"
            )
        targets = self.target_ids(job.targets) if job.targets is not None else None
        top_k = min(job.top_k, len(targets) if targets is not None else len(self.tokenizer))
        return MaskInput(tuple(ids), positions, top_k, targets)

    def target_ids(self, targets: str | list[str]) -> tuple[int, ...]:
        """Token ids of the target words, as the fill-mask pipeline picks them: the word's own token, else
        its first token; words with no token are dropped."""
        vocab = self.tokenizer.get_vocab()
        ids = []
        for target in [targets] if isinstance(targets, str) else targets:
            token = vocab.get(target)
            if token is None:
                pieces = self.tokenizer(target, add_special_tokens=False)["input_ids"]
                if not pieces:
                    continue
                token = pieces[0]
            ids.append(int(token))
        if not ids:
            raise InvalidInput("no target is a token of this model's vocabulary", param="targets")
        return tuple(set(ids))  # the pipeline's order, which decides between equal scores

    def size(self, item: MaskInput) -> int:
        return len(item.input_ids)

    def forward(self, batch: Sequence[MaskInput]) -> list[Any]:
        ids, mask = pad_right(
            [x.input_ids for x in batch], pad_token_id(self.tokenizer, self.model.config), self.device
        )
        rows = torch.tensor([b for b, item in enumerate(batch) for _ in item.mask_positions], device=self.device)
        cols = torch.tensor([p for item in batch for p in item.mask_positions], device=self.device)
        logits = self._masked_logits(ids, mask, rows, cols)
        out, at = [], 0
        for item in batch:
            probs = logits[at : at + len(item.mask_positions)].softmax(dim=-1)
            at += len(item.mask_positions)
            if item.target_ids is not None:
                targets = torch.tensor(item.target_ids, device=probs.device)
                values, picked = probs[..., targets].topk(item.top_k)
                indices = targets[picked]
            else:
                values, indices = probs.topk(item.top_k)
            out.append((values.float().cpu().tolist(), indices.cpu().tolist()))
        return out

    def _masked_logits(
        self, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
    ) -> torch.Tensor:
        """Vocabulary logits at the mask positions only.

        The vocabulary projection is most of a masked LM's cost (30k-wide for BERT) and only the masked
        positions need it, so the projection's input is cut down to those rows before it runs.
        """
        head = self.model.get_output_embeddings()
        if head is None:
            return self.model(input_ids=ids, attention_mask=mask).logits[rows, cols]
        handle = head.register_forward_pre_hook(lambda _m, args: (args[0][rows, cols], *args[1:]))
        try:
            logits = self.model(input_ids=ids, attention_mask=mask).logits
        finally:
            handle.remove()
        if logits.dim() != 2 or logits.shape[0] != rows.shape[0]:
            return self.model(input_ids=ids, attention_mask=mask).logits[rows, cols]  # a head that reshapes
        return logits

    def postprocess(self, item: MaskInput, raw: Any) -> FillMaskResult:
        values, indices = raw
        single = len(item.mask_positions) == 1
        pad = self.tokenizer.pad_token_id
        masks = []
        for pos, vals, idxs in zip(item.mask_positions, values, indices, strict=True):
            row = []
            for v, p in zip(vals, idxs, strict=True):
                tokens = list(item.input_ids)
                tokens[pos] = p
                tokens = [t for t in tokens if t != pad]
                # As the pipeline does: keep the other [MASK]s visible when a text has several.
                sequence = self.tokenizer.decode(tokens, skip_special_tokens=single)
                row.append(MaskCandidate(score=v, token=p, token_str=self.tokenizer.decode([p]), sequence=sequence))
            masks.append(row)
        return FillMaskResult(model=self.entry.name, masks=masks, usage=Usage(prompt_tokens=len(item.input_ids)))
