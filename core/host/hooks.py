"""Read and write activations at hookpoints for the duration of one forward pass (or one generate call).

Hooks live only inside `installed_hooks(...)`: they are removed in a `finally`, so no hook outlives
its request, also when the body raises. Reads see the activation that actually flowed, i.e. after
any write at the same hookpoint. With `stop_after_reads`, the forward pass is cut short (by raising
`StopForward` from the hook) as soon as every requested read has been captured, so later layers and
the unembedding never run.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from core.host.hookpoints import Hookpoint, HookpointRegistry

ActivationEdit = Callable[[Tensor], Tensor]
"""Maps the activation at a hookpoint, (B, T, d), to the activation that flows on, same shape."""


class StopForward(Exception):
    """Raised inside a hook to end a forward pass once everything needed has been read."""


class Captures:
    """Activations read at hookpoints; one chunk per module call, joined along the token axis.

    A single forward pass gives one chunk per hookpoint; `generate` gives the prefill chunk and then
    one chunk per decode step, so `captures[name]` covers every position the model processed.
    """

    def __init__(self) -> None:
        self._chunks: dict[str, list[Tensor]] = defaultdict(list)

    def add(self, name: str, value: Tensor) -> None:
        self._chunks[name].append(value.detach())

    def __contains__(self, name: object) -> bool:
        return name in self._chunks

    def __getitem__(self, name: str) -> Tensor:
        chunks = self._chunks.get(name)
        if not chunks:
            raise KeyError(f"nothing was captured at {name!r}")
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)  # (B, T, d)

    def names(self) -> list[str]:
        return list(self._chunks)


def add_vector(vector: Tensor) -> ActivationEdit:
    """An edit that adds `vector` (d,) to every position, e.g. a steering vector."""

    def edit(x: Tensor) -> Tensor:  # x: (B, T, d)
        return x + vector.to(device=x.device, dtype=x.dtype)

    return edit


def replace_with(value: Tensor) -> ActivationEdit:
    """An edit that replaces the activation by `value`, broadcast to (B, T, d)."""

    def edit(x: Tensor) -> Tensor:
        return value.to(device=x.device, dtype=x.dtype).expand_as(x)

    return edit


def _apply_edit(point: Hookpoint, edit: ActivationEdit, x: Tensor) -> Tensor:
    edited = edit(x)
    if edited.shape != x.shape:
        raise ValueError(f"edit at {point.name} returned shape {tuple(edited.shape)}, expected {tuple(x.shape)}")
    return edited.to(dtype=x.dtype)


class _HookProgram:
    """What to do at one hookpoint: optionally edit, optionally read, then maybe stop."""

    def __init__(
        self,
        point: Hookpoint,
        edit: ActivationEdit | None,
        read: bool,
        captures: Captures,
        pending: set[str] | None,
    ) -> None:
        self.point, self.edit, self.read = point, edit, read
        self.captures, self.pending = captures, pending

    def _visit(self, x: Tensor) -> Tensor:
        if self.edit is not None:
            x = _apply_edit(self.point, self.edit, x)
        if self.read:
            self.captures.add(self.point.name, x)
            if self.pending is not None:
                self.pending.discard(self.point.name)
                if not self.pending:
                    raise StopForward
        return x

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args:
            new = self._visit(args[0])
            return (new, *args[1:]), kwargs
        new = self._visit(kwargs["hidden_states"])
        return args, {**kwargs, "hidden_states": new}

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if isinstance(output, tuple):
            return (self._visit(output[0]), *output[1:])
        return self._visit(output)


@contextmanager
def installed_hooks(
    registry: HookpointRegistry,
    reads: Sequence[str] = (),
    writes: Mapping[str, ActivationEdit] | None = None,
    *,
    stop_after_reads: bool = False,
) -> Iterator[Captures]:
    """Install read/write hooks for the body of the `with`; always removed on exit.

    Unknown hookpoint names raise `NotFound` before anything is installed.
    """
    writes = dict(writes or {})
    read_set = {p.name for p in registry.resolve(list(reads))}
    points = registry.resolve([*read_set, *writes])
    captures = Captures()
    pending = set(read_set) if stop_after_reads and read_set else None
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for point in points:
            program = _HookProgram(point, writes.get(point.name), point.name in read_set, captures, pending)
            module = registry.module(point)
            if point.is_input:
                handles.append(module.register_forward_pre_hook(program.pre_hook, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(program.post_hook, with_kwargs=True))
        yield captures
    finally:
        for handle in handles:
            handle.remove()
