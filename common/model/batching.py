"""Token ids and batches: tokenise once, pad each batch only to its longest text."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset


def encode(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    if not texts:  # e.g. no validation part; fast tokenizers fail on an empty batch
        return []
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


class TokenDataset(Dataset):
    """(token ids, label) pairs; `collate` pads them per batch."""

    def __init__(self, token_ids: list[list[int]], labels: torch.Tensor):
        self.token_ids, self.labels = token_ids, labels

    def __len__(self) -> int:
        return len(self.token_ids)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.token_ids[i], int(self.labels[i])


class PadCollator:
    """Pads to the longest sequence of the batch.

    It also writes position and token-type ids out in full: BERT's own buffers
    for them are shared across the batch, which breaks Opacus' per-example
    gradients once the embeddings are trained.
    """

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: Sequence[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        width = max((len(ids) for ids, _ in batch), default=1)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, _) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            attention[row, : len(ids)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "token_type_ids": torch.zeros_like(input_ids),
            "position_ids": torch.arange(width).expand(len(batch), width).contiguous(),
            "labels": torch.as_tensor([label for _, label in batch], dtype=torch.long),
        }


def length_batches(token_ids: Sequence[Sequence[int]], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of similar length: least padding for inference."""
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]
