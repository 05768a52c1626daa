"""Hostile stack directories are refused with a clear message before any tensor or graph is used, by every
reader: the trainer's `read_stack`, the server's load path (`load_served_stack`, startup) and the
activation-only path (`read_summary`, `load_onnx_stack`).

The attacker here controls the directory, so hashes and sizes in stack.json are forged to match (a hash
only catches corruption); what must hold is that no pickle is ever unpickled, no file outside the directory
is read, no declared shape is allocated, and no tensor is loaded nor graph opened before the stack has
passed every check. tests/core/stack/test_stack.py covers the trainer reader case by case; this file runs the
same attacks through all three readers at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import core.stack.tensors as stack_module
import service.engine.stacks.onnx_runtime as onnx_runtime
from core.errors import FailedPrecondition
from core.host.host_model import HostModel
from core.stack.manifest import MAX_DIMENSION, StackError, read_summary
from core.stack.reader import read_stack
from service.engine.stacks.onnx_runtime import load_onnx_stack
from service.engine.stacks.served import load_served_stack
from tests.service.conftest import ServerLoop, make_server, server_config
from tests.service.onnx_stacks import write_resae_stack

MARKER = "pickle-was-executed"


class Payload:
    """A pickle that, if ever unpickled, creates a file next to the stack (proof that it ran)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def manifest(root: Path) -> dict:
    return json.loads((root / "stack.json").read_text())


def save(root: Path, data: dict) -> None:
    (root / "stack.json").write_text(json.dumps(data))


def forge(root: Path, old: str, new: str | None = None) -> None:
    """Point every record that names `old` at `new` (default: the same name) with `new`'s real sha256 and size,
    as an attacker who controls the directory would, ONNX `source` records included."""
    new = new or old
    path = new if os.path.isabs(new) else root / new
    data_path = Path(path)
    record = {"sha256": hashlib.sha256(data_path.read_bytes()).hexdigest(), "bytes": data_path.stat().st_size}
    data = manifest(root)
    data["files"].pop(old)
    data["files"][new] = record
    for stage in data["stages"]:
        for rec in (stage, stage.get("extra_tensors"), stage.get("residual")):
            if isinstance(rec, dict) and rec.get("file") == old:
                rec.update(file=new, **record)
        onnx = stage.get("onnx")
        if isinstance(onnx, dict) and old in onnx.get("source", {}):
            del onnx["source"][old]
            onnx["source"][new] = record["sha256"]
    save(root, data)


def weights(root: Path) -> str:
    return manifest(root)["stages"][0]["file"]


# ------------------------------------------------------------------------------------------------ attacks


def pickle_file(root: Path) -> None:
    (root / "stage_00.pt").write_bytes(pickle.dumps(Payload(root.parent / MARKER)))
    forge(root, weights(root), "stage_00.pt")


def pickle_named_safetensors(root: Path) -> None:
    (root / weights(root)).write_bytes(pickle.dumps(Payload(root.parent / MARKER)))
    forge(root, weights(root))


def dot_dot(root: Path) -> None:
    shutil.copy(root / weights(root), root.parent / "outside.safetensors")
    forge(root, weights(root), "../outside.safetensors")


def absolute(root: Path) -> None:
    shutil.copy(root / weights(root), root.parent / "outside.safetensors")
    forge(root, weights(root), str(root.parent / "outside.safetensors"))


def symlink_out(root: Path) -> None:
    file = weights(root)
    (root / file).rename(root.parent / "outside.safetensors")
    (root / file).symlink_to(root.parent / "outside.safetensors")  # same bytes, same hash: only the place is wrong


def manifest_symlink_out(root: Path) -> None:
    (root / "stack.json").rename(root.parent / "elsewhere.json")
    (root / "stack.json").symlink_to(root.parent / "elsewhere.json")


def huge_d_sae(root: Path) -> None:
    data = manifest(root)
    data["stages"][0]["d_sae"] = data["stages"][0]["sae_config"]["d_sae"] = 10**12
    save(root, data)


def overflowing_d_sae(root: Path) -> None:  # torch's own size arithmetic overflows on these
    data = manifest(root)
    data["stages"][0]["d_sae"] = data["stages"][0]["sae_config"]["d_sae"] = 2**62
    save(root, data)


def huge_d_in(root: Path) -> None:
    data = manifest(root)
    data["stages"][0]["d_in"] = data["stages"][0]["sae_config"]["d_in"] = MAX_DIMENSION + 1
    save(root, data)


def retyped(dtype: torch.dtype) -> Callable[[Path], None]:
    def attack(root: Path) -> None:
        file = weights(root)
        tensors = load_file(str(root / file))
        save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(root / file))
        forge(root, file)
    return attack


def flipped_weights(root: Path) -> None:
    path = root / weights(root)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))


def flipped_graph(root: Path) -> None:
    path = root / manifest(root)["stages"][0]["onnx"]["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


# name -> (attack, words the message must contain, refused by the ONNX path too)
ATTACKS: dict[str, tuple[Callable[[Path], None], tuple[str, ...], bool]] = {
    "pickle-file": (pickle_file, ("stage_00.pt", "pickle"), True),
    "pickle-named-safetensors": (pickle_named_safetensors, ("not a valid safetensors file",), False),
    "dot-dot": (dot_dot, ("../outside.safetensors", "plain file names"), True),
    "absolute-path": (absolute, ("outside.safetensors", "plain file names"), True),
    "symlink-out": (symlink_out, ("symlink", "outside the stack directory"), True),
    "manifest-symlink-out": (manifest_symlink_out, ("stack.json", "symlink"), True),
    "huge-d_sae": (huge_d_sae, ("d_sae", "out of range"), True),
    "overflowing-d_sae": (overflowing_d_sae, ("d_sae", "out of range"), True),
    "huge-d_in": (huge_d_in, ("d_in", "out of range"), True),
    "float16-weights": (retyped(torch.float16), ("expected F32",), False),
    "int64-weights": (retyped(torch.int64), ("expected F32",), False),
    "hash-mismatch-weights": (flipped_weights, ("corrupt", "sha256"), True),
    "hash-mismatch-graph": (flipped_graph, ("corrupt", ".onnx"), True),
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, tiny_gemma: HostModel) -> Path:
    """A two-stage ReSAE stack for the tiny host, with ONNX graphs (tests/service/onnx_stacks.py)."""
    return write_resae_stack(tmp_path_factory.mktemp("pristine") / "stack", tiny_gemma)


@pytest.fixture
def nothing_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a tensor or opening a graph fails the test: refusals must come before either."""

    def tensor_loaded(*_: object, **__: object) -> None:
        raise AssertionError("a tensor was loaded from a hostile stack")

    def graph_opened(*_: object, **__: object) -> None:
        raise AssertionError("an ONNX graph was opened from a hostile stack")

    monkeypatch.setattr(stack_module, "load_safetensors_bytes", tensor_loaded)
    monkeypatch.setattr(onnx_runtime.ort, "InferenceSession", graph_opened)


def hostile_copy(pristine: Path, tmp_path: Path, attack: Callable[[Path], None]) -> Path:
    root = shutil.copytree(pristine, tmp_path / "stack")
    attack(root)
    return root


@pytest.mark.parametrize("name", list(ATTACKS))
def test_every_reader_refuses_before_using_anything(name: str, pristine: Path, tmp_path: Path, tiny_gemma: HostModel,
                                                    nothing_is_used: None) -> None:
    attack, needles, onnx_too = ATTACKS[name]
    root = hostile_copy(pristine, tmp_path, attack)

    def says_why(message: str) -> None:
        assert all(n in message for n in needles), message

    with pytest.raises(StackError) as trainer_error:
        read_stack(root)
    says_why(str(trainer_error.value))
    with pytest.raises(FailedPrecondition) as server_error:
        load_served_stack(root, tiny_gemma, self_check=False)
    assert "cannot serve the stack" in server_error.value.message
    says_why(server_error.value.message)
    if onnx_too:
        with pytest.raises(StackError) as summary_error:
            read_summary(root)
        says_why(str(summary_error.value))
        with pytest.raises(FailedPrecondition) as onnx_error:
            load_onnx_stack(root)
        says_why(onnx_error.value.message)
    assert not (tmp_path / MARKER).exists(), "the pickle payload ran"


def test_the_pristine_stack_loads_through_every_reader(pristine: Path, tiny_gemma: HostModel) -> None:
    """The attacks above are refused for what they change, not because the base stack is broken."""
    assert len(read_stack(pristine).stages) == 2
    assert load_served_stack(pristine, tiny_gemma, self_check=False).stage_names == ["signed", "resid"]
    assert len(load_onnx_stack(pristine).stages) == 2


def test_a_server_refuses_to_start_on_a_hostile_stack(pristine: Path, tmp_path: Path, rel_loop: ServerLoop) -> None:
    """Startup fails with the reader's message and health never turns SERVING (the server's own load path)."""
    root = hostile_copy(pristine, tmp_path, pickle_file)
    server = make_server(rel_loop, server_config(root, self_check=False))
    with pytest.raises(FailedPrecondition, match="pickle-based formats are never loaded"):
        rel_loop.run(server.start())
    assert server.health.statuses()["readiness"] == "NOT_SERVING"
    assert not (tmp_path / MARKER).exists()
