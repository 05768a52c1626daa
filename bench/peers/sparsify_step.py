"""EleutherAI sparsify's TopK SparseCoder training step, as its trainer runs it (peer venv; see worker.py).

Arguments (JSON): d_in, width, k, batch, threads, seed. One call of "step" runs on the next of four N(0, 1)
batches of shape (batch, d_in): `sae(x)` (fused encoder: linear + top-k, sparse decode), the FVU loss (AuxK is
zero: no latent is dead, as early in a healthy run), backward, `remove_gradient_parallel_to_decoder_directions`,
Adam (sparsify's default lr for this width), zero_grad, and `set_decoder_norm_to_unit_norm` (sparsify's trainer
only renormalises at start-up; featurewire's step renormalises every step, so the peer does too: it costs
one pass over W_dec).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import worker


def build(cfg: dict[str, Any]) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    from sparsify import SparseCoder, SparseCoderConfig

    d_in, width, k, batch = int(cfg["d_in"]), int(cfg["width"]), int(cfg["k"]), int(cfg["batch"])
    torch.manual_seed(int(cfg.get("seed", 0)))
    gen = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
    batches = [torch.randn(batch, d_in, generator=gen) for _ in range(4)]  # (batch, d_in), E‖x‖² = d_in
    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=width, k=k), device="cpu", dtype=torch.float32)
    sae.b_dec.data = batches[0].mean(0)  # as sparsify's trainer initialises it
    lr = 2e-4 / (width / 2**14) ** 0.5  # sparsify's default Adam lr for this many latents
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    state = {"i": 0}

    def step() -> float:
        state["i"] += 1
        out = sae(batches[state["i"] % len(batches)])
        loss = out.fvu + out.auxk_loss + out.multi_topk_fvu / 8  # the trainer's "fvu" loss
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        sae.set_decoder_norm_to_unit_norm()
        return float(out.fvu.detach())

    def fvu() -> float:  # a check that training moves: FVU on the first batch, without a step
        with torch.no_grad():
            return float(sae(batches[0]).fvu)

    from sparsify import utils

    info = {"versions": worker.versions("eai-sparsify"), "torch_threads": torch.get_num_threads(),
            "decoder": getattr(utils.decoder_impl, "__name__", str(utils.decoder_impl)), "lr": lr}
    return {"step": step, "fvu": fvu}, info


if __name__ == "__main__":
    worker.run(build)
