"""Tiny vision transformer built from nn.Linear layers only (so FP8 and fake-quant can swap them)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    """Multi-head self-attention with separate ``qkv`` and ``proj`` Linear layers."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"vit dim={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: LayerNorm, attention, LayerNorm, GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch embedding (Linear over flattened patches), class token, ``depth`` blocks, ``classifier``.

    ``patch_size=None`` picks 2 for images up to 16 pixels wide, else 4.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, dim: int = 64, depth: int = 2,
                 heads: int = 4, mlp_ratio: int = 2, patch_size: int | None = None) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"vit needs images shaped (C, H, W); got input_shape={tuple(input_shape)!r}")
        c, h, w = input_shape
        p = patch_size or (2 if max(h, w) <= 16 else 4)
        if h % p or w % p:
            raise ValueError(f"vit patch_size={p} must divide the image size {h}x{w}")
        self.patch_size = p
        self.patch_embed = nn.Linear(c * p * p, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (h // p) * (w // p) + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        p = self.patch_size
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), self.patch_embed(patches)], dim=1)
        tokens = self.blocks(tokens + self.pos_embed)
        return self.classifier(self.norm(tokens[:, 0]))
