"""nn.Linear with a faster path for the few-row products of decoding."""
from __future__ import annotations

import torch
from torch import nn

SPLIT = 4  # weight row-blocks, one bmm batch entry (and thread task) each
MAX_ROWS = 16  # inputs with more rows than this are GEMM-shaped: the plain path is best


class Linear(nn.Linear):
    """An `nn.Linear` (same parameters, same names) whose
    products with at most MAX_ROWS input rows, outside autograd, run as one bmm over SPLIT
    row-blocks of the weight.

    Why: for x (1..16, K) @ W.T MKL picks sgemv / small-M sgemm, which on CPU
    stream W on one core at about half the memory bandwidth; a bmm over
    W.view(SPLIT, N/SPLIT, K) is parallel over the blocks and reads W at close
    to full bandwidth. Decoding reads every weight once per step, so this
    is the decode speed. The view needs no copy; each output is the same
    length-K dot product (logits matched F.linear exactly on the presets).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > MAX_ROWS or self.out_features % SPLIT or torch.is_grad_enabled():  # training keeps F.linear's numbers
            return super().forward(x)
        w = self.weight.view(SPLIT, self.out_features // SPLIT, self.in_features)  # (S, N/S, K)
        xs = x.reshape(1, rows, self.in_features).expand(SPLIT, rows, self.in_features)  # (S, rows, K)
        y = torch.bmm(xs, w.transpose(1, 2)).transpose(0, 1).reshape(*x.shape[:-1], self.out_features)  # (..., N)
        return y if self.bias is None else y + self.bias
