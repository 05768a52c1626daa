"""Sparse codes: decode, and backpropagate, through the active latents only.

Why: a TopK or BatchTopK code has k of H latents active per token (k = 32 of H = 4096 for the Gemma 3 270M
SAEs), so a dense decode z @ W_dec and its two backward matmuls spend 127/128 of their FLOPs on zeros, as do
the encoder's weight- and input-gradient matmuls, whose pre-activation gradient is non-zero only where a
latent is kept. Here a code is (values (nnz,), `SparsePattern`), and
- decode:    x̂[n] = Σ_{(n, j) active} v · W_dec[j]                      embedding_bag over each token's entries
- backward:  ∂v = ⟨g[n], W_dec[j]⟩ at the active entries only              sampled matmul (SDDMM)
             ∂W_dec[j] = Σ_{(n, j) active} v · g[n]                      embedding_bag over each latent's entries
- encoder:   ∂W_enc[:, j] = Σ_{(n, j) active} G · (x − b_dec)[n]         the same per-latent bags
             ∂b_enc = Σ_n G,  ∂b_dec = −W_enc ∂b_enc
All gradients are dense tensors (Adam needs dense gradients) whose rows of inactive latents are zero.
Results equal the dense formulation up to fp32 summation order (tests/core/sae/test_sparse_decode.py).
"""

from __future__ import annotations

import warnings
from functools import cached_property
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

SPARSE_DENSITY = 1 / 32
"""`decode_codes` decodes a dense code sparsely when at most this fraction of it is non-zero ..."""
SPARSE_MAX_ROWS = 8
"""... and it has at most this many rows. Few rows (a generation step, a short request) make the matmul read all
of W_dec for little work, while the sparse decode reads the active rows only: on 2 CPU cores, d = 640, H = 4096,
k = 32, one token decodes ~6x faster and 4 tokens ~2x. With more rows, finding the non-zeros of a dense (N, H)
code costs about as much as the matmul (and more on a busy machine), so the matmul stays; the training step
never builds the dense code first."""


class SparsePattern:
    """Which (token, latent) entries of an (N, H) code are active: rows sorted, CSR by token for decoding
    and, built on first use, the same entries grouped by latent for the weight gradients."""

    def __init__(self, rows: Tensor, cols: Tensor, n_rows: int, n_cols: int, row_offsets: Tensor | None = None):
        self.rows = rows  # (nnz,) long, non-decreasing
        self.cols = cols  # (nnz,) long
        self.n_rows, self.n_cols = n_rows, n_cols
        if row_offsets is None:
            row_offsets = _offsets(rows, n_rows)
        self.row_offsets = row_offsets  # (n_rows + 1,) long

    @classmethod
    def from_topk(cls, indices: Tensor, n_cols: int) -> SparsePattern:
        """From per-token top-k indices (N, k): entry n·k + i is (n, indices[n, i])."""
        n, k = indices.shape
        device = indices.device
        rows = torch.arange(n, device=device).repeat_interleave(k)  # (N·k,)
        return cls(rows, indices.reshape(-1), n, n_cols, torch.arange(0, n * k + 1, k, device=device))

    @classmethod
    def from_flat(cls, flat: Tensor, n_rows: int, n_cols: int) -> SparsePattern:
        """From sorted flat indices row·n_cols + col into the (n_rows, n_cols) code."""
        return cls(flat.div(n_cols, rounding_mode="floor"), flat.remainder(n_cols), n_rows, n_cols)

    @classmethod
    def from_mask(cls, mask: Tensor) -> SparsePattern:
        """From a boolean (N, H) mask of the active entries."""
        return cls.from_flat(mask.reshape(-1).nonzero().squeeze(1), *mask.shape)

    @property
    def nnz(self) -> int:
        return self.cols.numel()

    @cached_property
    def flat(self) -> Tensor:
        return self.rows * self.n_cols + self.cols  # (nnz,)

    @cached_property
    def by_col(self) -> tuple[Tensor, Tensor, Tensor]:
        """(order (nnz,) sorting the entries by latent, their rows in that order, offsets (n_cols + 1,))."""
        order = _argsort(self.cols, self.n_cols)
        return order, self.rows[order], _offsets(self.cols, self.n_cols)

    def csr(self, values: Tensor) -> Tensor:
        with warnings.catch_warnings():  # "sparse CSR support is in beta": only its sampled matmul is used
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(self.row_offsets, self.cols, values, (self.n_rows, self.n_cols),
                                           check_invariants=False)

    def gather(self, dense: Tensor) -> Tensor:
        """The entries of a dense (N, H) tensor at the pattern: (nnz,)."""
        return dense.reshape(-1)[self.flat]

    def rows_sum(self, table: Tensor, weights: Tensor) -> Tensor:
        """Σ over each token's entries of weights · table[col]: (N, table.shape[1])."""
        if self.nnz == 0:
            return table.new_zeros(self.n_rows, table.shape[1])
        return F.embedding_bag(self.cols, table, self.row_offsets, mode="sum", per_sample_weights=weights,
                               include_last_offset=True)

    def cols_sum(self, table: Tensor, weights: Tensor) -> Tensor:
        """Σ over each latent's entries of weights · table[row]: (H, table.shape[1])."""
        if self.nnz == 0:
            return table.new_zeros(self.n_cols, table.shape[1])
        order, rows, offsets = self.by_col
        return F.embedding_bag(rows, table, offsets, mode="sum", per_sample_weights=weights[order],
                               include_last_offset=True)

    def sampled_dot(self, a: Tensor, b: Tensor) -> Tensor:
        """⟨a[row], b[col]⟩ for each entry, a (N, d), b (H, d): (nnz,), without the dense a bᵀ."""
        if self.nnz == 0:
            return a.new_zeros(0)
        if a.dtype in (torch.float32, torch.float64):
            pattern = self.csr(a.new_zeros(self.nnz))
            return torch.sparse.sampled_addmm(pattern, a, b.t(), beta=0.0).values()
        return (a[self.rows] * b[self.cols]).sum(-1)  # half precision: sampled_addmm has no kernel on CPU


def _argsort(index: Tensor, n: int) -> Tensor:
    """A stable argsort of non-negative ints below n: (len,) long.

    On CPU, numpy's radix sort of 16-bit keys: ~0.2 ms for 32k entries, where torch's sort takes about as
    long on a quiet machine but tens of ms right after a parallel op on a busy one (its threads contend
    with the OpenMP workers still spinning)."""
    if index.device.type == "cpu" and n <= 2**16:
        keys = index.numpy().astype(np.uint16)
        return torch.from_numpy(np.argsort(keys, kind="stable"))
    return torch.sort(index.to(torch.int32) if n < 2**31 else index, stable=True).indices


def sort_index(index: Tensor) -> Tensor:
    """`index` (long) sorted ascending; on CPU through numpy (single-threaded SIMD sort, for the reason in
    `_argsort`)."""
    if index.device.type == "cpu":
        return torch.from_numpy(np.sort(index.numpy()))
    return index.sort().values


def _offsets(index: Tensor, n: int) -> Tensor:
    """Start of each value's run once `index` is sorted: (n + 1,)."""
    counts = torch.bincount(index, minlength=n)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])  # (n + 1,)


class _Decode(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, values: Tensor, W_dec: Tensor, pattern: SparsePattern) -> Tensor:
        ctx.pattern = pattern
        ctx.save_for_backward(values, W_dec)
        return pattern.rows_sum(W_dec, values)  # (N, d)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        values, W_dec = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        grad = grad.contiguous()
        grad_values = pattern.sampled_dot(grad, W_dec) if ctx.needs_input_grad[0] else None
        grad_W_dec = pattern.cols_sum(grad, values) if ctx.needs_input_grad[1] else None
        return grad_values, grad_W_dec, None


def sparse_decode(values: Tensor, pattern: SparsePattern, W_dec: Tensor) -> Tensor:
    """Σ over each token's active entries of value · W_dec[latent] (no decoder bias): (N, d).
    The gradient reaches `values` and the active rows of W_dec only."""
    return _Decode.apply(values, W_dec, pattern)


class _Reconstruction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, values: Tensor, W_dec: Tensor, b_dec: Tensor, x: Tensor,
                pattern: SparsePattern) -> tuple[Tensor, Tensor]:
        x_hat = pattern.rows_sum(W_dec, values).add_(b_dec)  # (N, d)
        error = x - x_hat  # (N, d)
        flat = error.reshape(-1)
        ctx.pattern = pattern
        ctx.save_for_backward(values, W_dec, error)
        return x_hat, flat.dot(flat) / x.shape[0]

    @staticmethod
    def backward(ctx: Any, grad_x_hat: Tensor | None, grad_mse: Tensor) -> tuple[Tensor | None, ...]:
        values, W_dec, error = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        grad = error * (-2.0 / error.shape[0] * grad_mse)  # (N, d), ∂mse/∂x̂
        if grad_x_hat is not None:
            grad += grad_x_hat
        need_values, need_W, need_b, need_x = ctx.needs_input_grad[:4]
        grad_values = pattern.sampled_dot(grad, W_dec) if need_values else None
        grad_W_dec = pattern.cols_sum(grad, values) if need_W else None
        grad_b_dec = grad.sum(0) if need_b else None
        grad_x = error * (2.0 / error.shape[0] * grad_mse) if need_x else None
        return grad_values, grad_W_dec, grad_b_dec, grad_x, None


def sparse_reconstruction(values: Tensor, pattern: SparsePattern, W_dec: Tensor, b_dec: Tensor,
                          x: Tensor) -> tuple[Tensor, Tensor]:
    """(x̂ (N, d), mean over tokens of ‖x − x̂‖²) with x̂ = sparse_decode + b_dec, in a few fused passes: the
    training loss of the TopK family, with the gradients of `sparse_decode`."""
    return _Reconstruction.apply(values, W_dec, b_dec, x, pattern)


class _ActivePreActivations(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, x_centered: Tensor,
                values: Tensor, pattern: SparsePattern) -> Tensor:
        ctx.pattern = pattern
        ctx.save_for_backward(x_centered, W_enc, values)
        return values.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x_centered, W_enc, values = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        grad_pre = grad * (values > 0).to(grad.dtype)  # (nnz,), ReLU's gradient
        need_x, need_W, need_b_enc, need_b_dec = ctx.needs_input_grad[:4]
        grad_x = grad_W = grad_b_enc = grad_b_dec = None
        if need_b_enc or need_b_dec:
            colsum = W_enc.new_zeros(pattern.n_cols).index_add_(0, pattern.cols, grad_pre)  # (H,)
            grad_b_enc = colsum if need_b_enc else None
            grad_b_dec = -(colsum @ W_enc.t()) if need_b_dec else None  # (d,), W_enc is stored latent-major
        if need_W:
            grad_W = pattern.cols_sum(x_centered, grad_pre).t()  # (d, H)
        if need_x:
            grad_x = pattern.rows_sum(W_enc.t(), grad_pre)  # (N, d)
        return grad_x, grad_W, grad_b_enc, grad_b_dec, None, None, None


def active_pre_activations(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, x_centered: Tensor,
                           values: Tensor, pattern: SparsePattern) -> Tensor:
    """The ReLU pre-activations ReLU((x − b_dec) W_enc + b_enc) at the pattern's entries, (nnz,), as autograd
    sees them. `values` are those entries already computed without a graph and `x_centered` is x − b_dec;
    the backward passes through the active entries only (never the dense (N, H) gradient)."""
    return _ActivePreActivations.apply(x, W_enc, b_enc, b_dec, x_centered, values, pattern)


class _ToDense(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, values: Tensor, pattern: SparsePattern) -> Tensor:
        ctx.pattern = pattern
        dense = values.new_zeros(pattern.n_rows * pattern.n_cols)
        return dense.index_copy_(0, pattern.flat, values).view(pattern.n_rows, pattern.n_cols)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return ctx.pattern.gather(grad.contiguous()), None


def to_dense(values: Tensor, pattern: SparsePattern) -> Tensor:
    """The (N, H) code with `values` at the pattern and zeros elsewhere, for consumers that want a dense code
    (dead-latent tracking, L0, serving); differentiable, though the training loss never goes through it."""
    return _ToDense.apply(values, pattern)


def decode_codes(z: Tensor, W_dec: Tensor) -> Tensor:
    """z W_dec for a dense (N, H) code z, through the active latents when z has few rows and few non-zeros
    (`SPARSE_MAX_ROWS`, `SPARSE_DENSITY`) and nothing needs its gradient; the plain matmul otherwise: (N, d)."""
    grad_needed = torch.is_grad_enabled() and (z.requires_grad or W_dec.requires_grad)
    if (grad_needed or z.dim() != 2 or not 0 < z.shape[0] <= SPARSE_MAX_ROWS or torch.jit.is_tracing()
            or torch.compiler.is_compiling()):  # tracing, compiling and ONNX export see the plain matmul
        return z @ W_dec
    if int(torch.count_nonzero(z[0])) > 2 * SPARSE_DENSITY * z.shape[1]:  # a dense code, seen from its first row
        return z @ W_dec
    mask = z != 0
    if int(mask.sum()) > SPARSE_DENSITY * z.numel():
        return z @ W_dec
    pattern = SparsePattern.from_mask(mask)
    return pattern.rows_sum(W_dec, pattern.gather(z).to(W_dec.dtype)).to(torch.result_type(z, W_dec))
