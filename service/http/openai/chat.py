"""Chat messages to a prompt: the tokenizer's `apply_chat_template`, with the template given at start
(`serve --chat-template FILE`, as vLLM takes one) or else the tokenizer's own.

A base model (the default Gemma 3 270M from its GGUF file) has no template; a chat request there is a 400 that
says how to give one, rather than a prompt made up here. The rendered text is tokenized without the
tokenizer's special tokens, since a chat template writes its own BOS (as vLLM does).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.errors import FailedPrecondition
from service.http.openai.errors import OpenAIError, bad_request

NO_TEMPLATE = ("this model has no chat template (a base model): start the server with --chat-template FILE (a "
               "Jinja chat template, as in a tokenizer_config.json's chat_template), or use /completions")


def load_template(path: Path | None) -> str | None:
    """The template text of `--chat-template`, checked to compile; a bad file stops startup with its reason."""
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise FailedPrecondition(f"cannot read the chat template {str(path)!r}: {reason}") from None
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().parse(text)
    except TemplateSyntaxError as exc:
        raise FailedPrecondition(f"the chat template {str(path)!r} is not valid Jinja: {exc.message} "
                                 f"(line {exc.lineno})") from None
    if not text.strip():
        raise FailedPrecondition(f"the chat template {str(path)!r} is empty")
    return text


def render(tokenizer: Any, template: str | None, messages: Sequence[dict[str, Any]]) -> str:
    """The prompt text for `messages`, ending with the assistant's turn opened (add_generation_prompt)."""
    chosen = template or getattr(tokenizer, "chat_template", None)
    if not chosen:
        raise bad_request(NO_TEMPLATE, "messages")
    try:
        text = tokenizer.apply_chat_template(list(messages), chat_template=chosen, tokenize=False,
                                             add_generation_prompt=True)
    except Exception as exc:  # the template's own raise_exception ("roles must alternate ...") or a render error
        raise bad_request(f"the chat template cannot render these messages: {exc}", "messages") from None
    if not isinstance(text, str) or not text:
        raise OpenAIError(400, "the chat template rendered an empty prompt for these messages", "messages")
    return text
