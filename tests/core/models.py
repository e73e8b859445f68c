"""Small models for tests that are not in torchvision / timm."""
import math

import torch
import torch.nn.functional as F
from torch import nn


class TinyBertLayer(nn.Module):
    def __init__(self, d=32, heads=4, ff=64):
        super().__init__()
        self.h, self.dk = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff1, self.ff2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.act = nn.GELU()

    def split(self, t):
        b, n, _ = t.shape
        return t.view(b, n, self.h, self.dk).transpose(1, 2)

    def forward(self, x):
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        att = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.dk)
        ctx = torch.matmul(F.softmax(att, dim=-1), v)
        b, h, n, dk = ctx.shape
        x = self.ln1(x + self.o(ctx.transpose(1, 2).reshape(b, n, h * dk)))
        return self.ln2(x + self.ff2(self.act(self.ff1(x))))


class TinyBert(nn.Module):
    """A BERT-style encoder classifier from plain torch modules (Embedding, LayerNorm, matmul, softmax, GELU)."""

    def __init__(self, vocab=100, d=32, layers=2, classes=3, max_len=16):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.ln = nn.LayerNorm(d)
        self.layers = nn.Sequential(*[TinyBertLayer(d) for _ in range(layers)])
        self.cls = nn.Linear(d, classes)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        x = self.ln(self.tok(ids) + self.pos(pos))
        return self.cls(self.layers(x)[:, 0])
