"""A small transformer encoder, trained on a real task from bundled data.

Each 8×8 digit becomes a 64-token sequence (token = pixel intensity 0..16, shifted by one so
that 0 is padding); the encoder (token + position embeddings, self-attention, GELU FFN,
LayerNorm, masked mean pooling) classifies the digit. Inputs `input_ids` and
`attention_mask` are int64 [batch, seq]: MatMul-heavy, two dynamic axes.
`python models/tiny_encoder/model.py` trains and prints the test accuracy.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import _shared  # noqa: E402

NAME = "tiny_encoder"
VOCAB, MAX_LEN, DIM, HEADS, FFN, LAYERS = 18, 128, 64, 4, 128, 2


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.norm1 = nn.LayerNorm(DIM)
        self.ffn = nn.Sequential(nn.Linear(DIM, FFN), nn.GELU(), nn.Linear(FFN, DIM))
        self.norm2 = nn.LayerNorm(DIM)

    def forward(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, s, _ = h.shape
        q, k, v = self.qkv(h).reshape(b, s, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(DIM // HEADS) + bias
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, DIM)
        h = self.norm1(h + self.proj(attn))
        return self.norm2(h + self.ffn(h))


class TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Embedding(MAX_LEN, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.head = nn.Linear(DIM, 10)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.tok(input_ids) + self.pos(positions)[None]
        mask = attention_mask.to(h.dtype)
        bias = (1.0 - mask)[:, None, None, :] * -1e4
        for block in self.blocks:
            h = block(h, bias)
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        return self.head(pooled)


def build() -> nn.Module:
    torch.manual_seed(_shared.SEED)
    return TinyEncoder()


def _inputs(images: np.ndarray) -> dict[str, np.ndarray]:
    ids = images.reshape(len(images), 64).astype(np.int64) + 1
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def trained() -> nn.Module:
    return _shared.trained_digits(NAME, __file__, build, _inputs, epochs=25, lr=2e-3)


def test_accuracy(model: nn.Module) -> float:
    return _shared.digits_test_accuracy(model, _inputs)


if __name__ == "__main__":
    print(f"{NAME}: PyTorch test accuracy {test_accuracy(trained()):.4f}")
