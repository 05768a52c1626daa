"""Tiny random host models for tests and smoke deployments, built offline and identically everywhere.

`tiny-random` is a 4-layer Gemma 3 text model (d_model 64) and `tiny-random-neox` a 4-layer
GPT-NeoX model (d_model 32, parallel residual). Their tokenizer is a byte-level BPE trained with
`tokenizers` on the fixed text below, so nothing is downloaded and every machine gets the same
vocabulary; weights come from a fixed seed without touching the global RNG.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0..3, Gemma's order
VOCAB_SIZE = 512
SEED = 1234

TRAINING_TEXT = """\
A sparse autoencoder reads an activation vector from the residual stream of a language model and
writes it back as a short list of features. Each feature has a direction in the model's space and a
value that says how strongly it is present. The encoder decides which features fire; the decoder adds
their directions back together. What the decoder cannot explain is the error, and the error matters:
it is the part of the model's computation that the dictionary does not yet describe.
Interpretability engineers watch features fire while the model writes. They pin a feature to a value,
ablate another, and compare the steered continuation with the default one. Application developers call
the same service to monitor a concept, to stop a generation when a feature crosses a threshold, or to
score a text with and without an intervention. The service must answer quickly, never crash on bad
input, and report what it measured: tokens, log-probabilities, feature values and error norms.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. How vexingly
quick daft zebras jump! The five boxing wizards jump quickly. Sphinx of black quartz, judge my vow.
def forward(self, x):\n    return self.decode(self.encode(x))\n
for i in range(10):\n    print(i * i)\n
Numbers and symbols: 0 1 2 3 4 5 6 7 8 9 + - * / = < > ( ) [ ] { } , . ; : ' " ! ? # % & @
"""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (no unknown tokens) that prepends <bos>, trained on TRAINING_TEXT."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(keepends=True), trainer=trainer)
    bos_id = tokenizer.token_to_id("<bos>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
    )


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def _gemma_config(tokenizer: PreTrainedTokenizerFast) -> Gemma3TextConfig:
    return Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        max_position_embeddings=512,
        sliding_window=32,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        initializer_range=0.1,
        **_special_ids(tokenizer),
    )


def _neox_config(tokenizer: PreTrainedTokenizerFast) -> GPTNeoXConfig:
    return GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        rotary_pct=0.25,
        max_position_embeddings=512,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        initializer_range=0.1,
        **_special_ids(tokenizer),
    )


_BUILDERS: dict[str, tuple[Callable, type[PreTrainedModel]]] = {
    "tiny-random": (_gemma_config, Gemma3ForCausalLM),
    "tiny-random-neox": (_neox_config, GPTNeoXForCausalLM),
}

SMOKE_MODEL_NAMES = tuple(_BUILDERS)


def build_smoke_model(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Build one of SMOKE_MODEL_NAMES in fp32 on the CPU."""
    make_config, model_class = _BUILDERS[name]
    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = model_class(make_config(tokenizer))
    model.eval()
    return model, tokenizer
