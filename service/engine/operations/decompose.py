"""Decompose a text into SAE features at the requested stages, streamed in chunks of tokens.

One forward pass reads every hookpoint the requested stages need (theirs, plus the hookpoints of the
stages their residuals read from) and stops after the last of them: later layers and the unembedding
never run. The stack runtime then decomposes the captured activations one chunk of tokens at a time
(teacher-forced, the same code the trainer evaluates with), so a client sees the first tokens' features
before the last chunk is computed, and each chunk costs one device-to-host copy per stage.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from core.host.host_model import HostModel
from service.engine.contract.specs import DecomposeChunk, DecomposeHeader, DecomposeSpec, StageCodes, TokenFeatures
from service.engine.operations.codes import stage_codes
from service.engine.stacks.served import ServedStack, predicted_error_norm

REPLACEMENT = "\ufffd"


def special_ids(tokenizer) -> set[int]:
    """The tokenizer's special token ids (BOS, EOS, pad, ...)."""
    return set(tokenizer.all_special_ids) | {i for i in (tokenizer.bos_token_id, tokenizer.pad_token_id)
                                             if i is not None}


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token's text on its own: the token decoded alone (special tokens kept, so BOS reads "<bos>"),
    which reads like the text (" the", "\\n") rather than like the vocabulary ("Ġthe", "▁the", "Ċ").
    A token that is only part of a UTF-8 character (byte-fallback and byte-level pieces) decodes to
    U+FFFD; for those the vocabulary entry is returned instead ("<0xE2>", "â"), which keeps tokens
    distinguishable rather than showing several identical "�"."""
    ids = [int(i) for i in ids]
    texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    out = []
    for token_id, text in zip(ids, texts, strict=True):
        if REPLACEMENT in text:
            piece = tokenizer.convert_ids_to_tokens(token_id)
            text = piece if isinstance(piece, str) and piece else text
        out.append(text)
    return out


def needed_hookpoints(stack: ServedStack, stages: Sequence[int]) -> list[str]:
    """Hookpoints the stages read, with their residual sources', in stage order (deduplicated)."""
    runtime = stack.runtime
    return list(dict.fromkeys(runtime.stages[i].hookpoint for i in runtime.dependencies(stages)))


def _chunk_codes(stack: ServedStack, spec: DecomposeSpec, acts: dict[str, Tensor]) -> list[list[StageCodes]]:
    """Per requested stage, the StageCodes of every token of one chunk; acts: hookpoint -> (n, d)."""
    runtime = stack.runtime
    results = runtime.decompose(acts, spec.stages)
    per_stage = []
    for i in spec.stages:
        stage, result = runtime.stages[i], results[i]
        error = predicted = None
        if spec.include_error:
            error = result.error_norm()  # (n,)
            prev = None if stage.residual_of is None else acts[runtime.stages[stage.residual_of].hookpoint]
            predicted = predicted_error_norm(stack, stage, acts[stage.hookpoint], prev)
        per_stage.append(stage_codes(i, result.codes, spec.top_k, always=spec.feature_filter.get(i, ()),
                                     error_norm=error, predicted=predicted))
    return per_stage


def decompose_events(host: HostModel, stack: ServedStack,
                     spec: DecomposeSpec) -> Iterator[DecomposeHeader | DecomposeChunk]:
    """The header, then chunks of `spec.chunk_tokens` tokens covering every position once, in order.

    Every token is decomposed, BOS included (positions count from 0 over `spec.token_ids`); special tokens are
    marked so that views of the text's features can leave them out. Features per
    token per stage are the top_k by |value| that are non-zero, then the stage's filter features whatever
    their value; error norms (actual and, when the stage has a predictor, predicted) with include_error.
    """
    ids = list(spec.token_ids)
    yield DecomposeHeader(stack=stack.name, stack_digest=stack.digest, stages=tuple(spec.stages),
                          num_tokens=len(ids), top_k=spec.top_k)
    reads = needed_hookpoints(stack, spec.stages)
    input_ids = torch.tensor([ids], dtype=torch.int64)  # (1, T)
    captures = host.forward(input_ids, reads=reads, logits=False).captures
    activations = {hp: captures[hp][0] for hp in reads}  # (T, d)
    step = max(1, spec.chunk_tokens)
    special = special_ids(host.tokenizer)
    for start in range(0, len(ids), step):
        end = min(start + step, len(ids))
        with torch.inference_mode():
            per_stage = _chunk_codes(stack, spec, {hp: a[start:end] for hp, a in activations.items()})
        texts = token_texts(host.tokenizer, ids[start:end])
        tokens = tuple(
            TokenFeatures(position=start + row, token_id=ids[start + row], text=texts[row],
                          features=tuple(codes[row] for codes in per_stage), special=ids[start + row] in special)
            for row in range(end - start)
        )
        yield DecomposeChunk(tokens)
