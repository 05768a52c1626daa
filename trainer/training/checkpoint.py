"""Training checkpoints without pickle: tensors in one safetensors file, the rest in JSON.

A checkpoint holds, per stage, the SAE parameters, the Adam state and the dead-latent counters (and the
same three for the stage's meta-SAE when meta-SAE regularised training is on), plus the step reached
and the config fingerprint (a resumed run must use the config it started with).
It is written to a temporary name and renamed, so an interruption mid-write keeps the previous one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from core.sae.base import SparseAutoencoder
from trainer.training.optimization import DeadLatentTracker

TENSORS = "checkpoint.safetensors"
META = "checkpoint.json"


@dataclass
class StageTrainingState:
    """What one stage needs to continue training exactly where it stopped."""

    sae: SparseAutoencoder
    optimizer: torch.optim.Adam
    tracker: DeadLatentTracker
    meta: StageTrainingState | None = None  # the meta-SAE critic (trainer/training/meta_sae.py), when enabled


def _flatten(index: int | str, state: StageTrainingState) -> dict[str, torch.Tensor]:
    tensors = {f"{index}.sae.{k}": v.detach().contiguous() for k, v in state.sae.state_dict().items()}
    for param_index, slots in state.optimizer.state_dict()["state"].items():
        for slot, value in slots.items():
            tensors[f"{index}.adam.{param_index}.{slot}"] = torch.as_tensor(value).contiguous()
    tensors[f"{index}.tokens_since_fired"] = state.tracker.tokens_since_fired.contiguous()
    if state.meta is not None:
        tensors.update(_flatten(f"{index}.meta", state.meta))
    return tensors


def save_checkpoint(directory: Path, step: int, fingerprint: str, stages: list[StageTrainingState]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for index, state in enumerate(stages):
        tensors.update(_flatten(index, state))
    meta = {
        "step": step,
        "config_fingerprint": fingerprint,
        "param_groups": [s.optimizer.state_dict()["param_groups"] for s in stages],
        "meta_param_groups": [s.meta.optimizer.state_dict()["param_groups"] if s.meta else None for s in stages],
    }
    save_file({k: v.cpu() for k, v in tensors.items()}, str(directory / f".{TENSORS}.tmp"))
    (directory / f".{META}.tmp").write_text(json.dumps(meta))
    os.replace(directory / f".{TENSORS}.tmp", directory / TENSORS)
    os.replace(directory / f".{META}.tmp", directory / META)


def load_checkpoint(directory: Path, fingerprint: str, stages: list[StageTrainingState]) -> int:
    """Restore `stages` in place from `directory`; returns the step to continue from (0 if none)."""
    if not (directory / META).is_file() or not (directory / TENSORS).is_file():
        return 0
    meta = json.loads((directory / META).read_text())
    if meta["config_fingerprint"] != fingerprint:
        raise ValueError(
            f"checkpoint in {directory} was made with a different config; use a new --out directory "
            "or delete the checkpoint to start over"
        )
    tensors = load_file(str(directory / TENSORS))
    for index, state in enumerate(stages):
        _restore(str(index), state, tensors, meta["param_groups"][index])
        if state.meta is not None:
            _restore(f"{index}.meta", state.meta, tensors, meta["meta_param_groups"][index])
    return int(meta["step"])


def _restore(key: str, state: StageTrainingState, tensors: dict[str, torch.Tensor], param_groups: list) -> None:
    device = state.tracker.tokens_since_fired.device
    prefix = f"{key}.sae."
    state.sae.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    adam: dict[int, dict[str, torch.Tensor]] = {}
    adam_prefix = f"{key}.adam."
    for name, value in tensors.items():
        if name.startswith(adam_prefix):
            param_index, slot = name[len(adam_prefix):].split(".", 1)
            adam.setdefault(int(param_index), {})[slot] = value.to(device) if slot != "step" else value
    state.optimizer.load_state_dict({"state": adam, "param_groups": param_groups})
    state.tracker.tokens_since_fired.copy_(tensors[f"{key}.tokens_since_fired"])
