"""The host model: a HF causal LM, its tokenizer and its hookpoints, with hooked forward and generate."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from core.errors import InvalidRequest
from core.host.devices import dtype_name
from core.host.hookpoints import HookpointRegistry
from core.host.hooks import ActivationEdit, Captures, StopForward, installed_hooks


@dataclass(frozen=True)
class ModelSummary:
    """What a client or an operator wants to know about the loaded host model."""

    name: str
    model_type: str
    num_layers: int
    d_model: int
    vocab_size: int
    num_parameters: int
    dtype: str
    device: str
    num_hookpoints: int


@dataclass(frozen=True)
class ForwardResult:
    captures: Captures
    logits: Tensor | None  # (B, T, vocab) when asked for
    completed: bool  # False when the pass was cut short after the last read


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings; temperature 0 means greedy."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidRequest(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (0 disables it), got {self.top_k}")


class HostModel:
    """Owns one loaded causal LM. Not thread-safe: the engine drives it from one worker thread."""

    def __init__(self, name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.name = name
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.hookpoints = HookpointRegistry(model)
        self.device: torch.device = next(model.parameters()).device
        self.dtype: torch.dtype = next(model.parameters()).dtype

    def summary(self) -> ModelSummary:
        config = self.model.config
        return ModelSummary(
            name=self.name,
            model_type=config.model_type,
            num_layers=self.hookpoints.num_layers,
            d_model=self.hookpoints.d_model,
            vocab_size=config.vocab_size,
            num_parameters=sum(p.numel() for p in self.model.parameters()),
            dtype=dtype_name(self.dtype),
            device=str(self.device),
            num_hookpoints=len(self.hookpoints),
        )

    def encode(self, text: str, *, add_special_tokens: bool = True) -> Tensor:
        """Token ids of `text`, (1, T) on the model's device (with BOS when the tokenizer adds one)."""
        ids = self.tokenizer(text, add_special_tokens=add_special_tokens, return_tensors="pt").input_ids
        if ids.shape[1] == 0:
            raise InvalidRequest("text produced no tokens; send a non-empty text")
        return ids.to(self.device)

    def decode(self, ids: Tensor | Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def _check_ids(self, input_ids: Tensor) -> Tensor:
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise InvalidRequest(f"input_ids must be (batch, tokens) with tokens > 0, got {tuple(input_ids.shape)}")
        vocab = self.model.config.vocab_size
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
            raise InvalidRequest(f"token ids must lie in [0, {vocab})")
        return input_ids.to(self.device)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: Tensor,
        *,
        reads: Sequence[str] = (),
        writes: Mapping[str, ActivationEdit] | None = None,
        logits: bool = False,
        attention_mask: Tensor | None = None,
    ) -> ForwardResult:
        """One forward pass with hooks. Without `logits`, only the body runs, and it stops after the
        last layer that a read needs (writes then only matter at or before that point)."""
        input_ids = self._check_ids(input_ids)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        stop_early = not logits and bool(reads)
        with installed_hooks(self.hookpoints, reads, writes, stop_after_reads=stop_early) as captures:
            runner = self.model if logits else self.model.base_model
            out = None
            with contextlib.suppress(StopForward):
                out = runner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return ForwardResult(captures, out.logits if logits and out is not None else None, out is not None)

    @torch.inference_mode()
    def generate(
        self,
        input_ids: Tensor,
        sampling: SamplingParams,
        *,
        reads: Sequence[str] = (),
        writes: Mapping[str, ActivationEdit] | None = None,
    ) -> tuple[Tensor, Captures]:
        """Continue `input_ids` (1, T); returns the new token ids (1, N) and what was read on the way.

        Writes apply at every position the model processes: the prompt and each generated token.
        """
        input_ids = self._check_ids(input_ids)
        do_sample = sampling.temperature > 0
        config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=do_sample,
            temperature=sampling.temperature if do_sample else None,
            top_p=sampling.top_p if do_sample else None,
            top_k=sampling.top_k if do_sample else None,  # 0 = off (None would bring in HF's default 50)
            eos_token_id=self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        generator_state = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])
        with generator_state, installed_hooks(self.hookpoints, reads, writes) as captures:
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            attention_mask = torch.ones_like(input_ids)
            output = self.model.generate(input_ids, attention_mask=attention_mask, generation_config=config)
        return output[:, input_ids.shape[1] :], captures
