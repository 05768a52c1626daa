"""`python -m service tour`: a tour of the host model runtime (no stack, no server).

Shows the model and its hookpoints, reads the residual stream at every layer in one pass, cuts a
pass short after the layer it needs, continues a prompt, and steers the continuation by adding a
direction to the residual stream ("Love" minus "Hate", the activation-addition recipe) through a
write hook. `make demo` (service/demo.py) shows the same model served with an SAE stack.
"""

from __future__ import annotations

import time

import torch

from core.config import ModelConfig
from core.host.hooks import add_vector
from core.host.host_model import HostModel, SamplingParams
from core.host.loading import load_host_model

PROMPT = "I think that dogs are"
STEER_HOOKPOINT_LAYER_FRACTION = 1 / 3  # early-middle layers carry concepts that steer well
STEER_STRENGTH = 0.2  # fraction of the prompt's mean residual norm


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def _show_model(host: HostModel) -> None:
    summary = host.summary()
    _section("host model")
    print(f"{summary.name}: {summary.model_type}, {summary.num_layers} layers, d_model {summary.d_model}, "
          f"vocab {summary.vocab_size}, {summary.num_parameters / 1e6:.0f}M parameters, "
          f"{summary.dtype} on {summary.device}")
    names = host.hookpoints.names()
    print(f"{len(names)} hookpoints, e.g. {', '.join(names[:4])}, …, {names[-1]}")


def _show_residual_norms(host: HostModel, ids: torch.Tensor) -> None:
    _section("residual stream, every layer, one forward pass")
    reads = [f"blocks.{i}.hook_resid_post" for i in range(host.hookpoints.num_layers)]
    result = host.forward(ids, reads=reads)
    tokens = host.tokenizer.convert_ids_to_tokens(ids[0].tolist())
    print("layer  " + " ".join(f"{t[:8]:>8}" for t in tokens))
    for i, name in enumerate(reads):
        norms = result.captures[name][0].norm(dim=-1)  # (T,)
        print(f"{i:>5}  " + " ".join(f"{n:8.1f}" for n in norms.tolist()))


def _show_early_stop(host: HostModel, ids: torch.Tensor) -> None:
    _section("early stop: read one layer, skip the rest")
    layer = host.hookpoints.num_layers // 3
    calls = {"layers": 0}
    layers = host.hookpoints.layers
    handles = [m.register_forward_pre_hook(lambda *_: calls.__setitem__("layers", calls["layers"] + 1))
               for m in layers]
    try:
        result = host.forward(ids, reads=[f"blocks.{layer}.hook_resid_post"])
    finally:
        for handle in handles:
            handle.remove()
    print(f"read blocks.{layer}.hook_resid_post: {calls['layers']} of {len(layers)} layers ran, "
          f"no logits computed (completed={result.completed})")


def _steering_vector(host: HostModel, hookpoint: str, ids: torch.Tensor) -> torch.Tensor:
    def last(text: str) -> torch.Tensor:
        captured = host.forward(host.encode(text, add_special_tokens=False), reads=[hookpoint]).captures
        return captured[hookpoint][0, -1]  # (d,)

    direction = last(" Love") - last(" Hate")
    scale = host.forward(ids, reads=[hookpoint]).captures[hookpoint][0, 1:].norm(dim=-1).mean()
    return direction / direction.norm() * scale * STEER_STRENGTH  # (d,)


def _show_generation(host: HostModel, ids: torch.Tensor) -> None:
    sampling = SamplingParams(max_new_tokens=24)
    _section("generation (greedy)")
    started = time.perf_counter()
    plain, _ = host.generate(ids, sampling)
    seconds = time.perf_counter() - started
    print(f"{PROMPT}|{host.decode(plain[0])!r}   ({plain.shape[1] / seconds:.1f} tokens/s)")

    layer = round(host.hookpoints.num_layers * STEER_HOOKPOINT_LAYER_FRACTION)
    hookpoint = f"blocks.{layer}.hook_resid_post"
    _section(f"steered: + (Love - Hate) at {hookpoint}")
    vector = _steering_vector(host, hookpoint, ids)
    steered, _ = host.generate(ids, sampling, writes={hookpoint: add_vector(vector)})
    print(f"default: {PROMPT}|{host.decode(plain[0])!r}")
    print(f"steered: {PROMPT}|{host.decode(steered[0])!r}")


def run_tour(config: ModelConfig) -> int:
    started = time.perf_counter()
    host = load_host_model(config)
    print(f"loaded in {time.perf_counter() - started:.1f}s")
    ids = host.encode(PROMPT)
    _show_model(host)
    _show_residual_norms(host, ids)
    _show_early_stop(host, ids)
    _show_generation(host, ids)
    return 0
