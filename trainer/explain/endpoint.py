"""A small client for any OpenAI-compatible endpoint (vLLM, llama.cpp, Ollama, OpenAI, featurewire's own
`/openai/v1`), over plain HTTP with urllib so the trainer needs no SDK: chat or completions, a timeout per
request, retries with exponential back-off on 429 and 5xx (honouring Retry-After), and the tokens used counted.

Errors that retrying cannot fix (unreachable host, 401/403, 4xx, a body that is not the API's JSON) raise
`EndpointError` with what was wrong, so a run stops with a clear message instead of storing guesses.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

RETRYABLE = frozenset({429, 500, 502, 503, 504})


class EndpointError(RuntimeError):
    """The endpoint could not answer usefully; the message says why and what to check."""


@dataclass
class Usage:
    """Requests made and tokens counted over a run (thread-safe: every worker adds to one)."""

    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, usage: dict[str, Any] | None, retries: int) -> None:
        with self.lock:
            self.requests += 1
            self.retries += retries
            if isinstance(usage, dict):
                self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
                self.completion_tokens += int(usage.get("completion_tokens") or 0)


@dataclass(frozen=True)
class EndpointConfig:
    url: str  # the API's base, e.g. http://localhost:8000/v1
    model: str
    api: str = "chat"  # "chat" (/chat/completions) or "completions" (/completions)
    api_key: str | None = None
    timeout: float = 60.0  # seconds per request
    retries: int = 4  # further tries after a 429/5xx
    backoff: float = 1.0  # seconds before the first retry, doubled each time
    max_tokens: int = 64


class Endpoint:
    def __init__(self, config: EndpointConfig, usage: Usage | None = None) -> None:
        if config.api not in ("chat", "completions"):
            raise ValueError(f"api must be 'chat' or 'completions', got {config.api!r}")
        self.config = config
        self.usage = usage or Usage()

    def complete(self, prompt: str, max_tokens: int | None = None) -> str:
        """The model's answer to `prompt` (greedy), as text; EndpointError when there is none."""
        c = self.config
        body: dict[str, Any] = {"model": c.model, "max_tokens": max_tokens or c.max_tokens, "temperature": 0}
        if c.api == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        reply, retries = self._post(f"{c.url.rstrip('/')}/{'chat/completions' if c.api == 'chat' else 'completions'}",
                                    body)
        self.usage.add(reply.get("usage"), retries)
        try:
            choice = reply["choices"][0]
            text = choice["message"]["content"] if c.api == "chat" else choice["text"]
        except (KeyError, IndexError, TypeError):
            where = "message.content" if c.api == "chat" else "text"
            raise EndpointError(f"the endpoint's answer has no choices[0].{where}: {json.dumps(reply)[:200]}") from None
        if not isinstance(text, str):
            raise EndpointError(f"the endpoint answered a non-text completion: {text!r:.100}")
        return text

    def _post(self, url: str, body: dict[str, Any]) -> tuple[dict[str, Any], int]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        data = json.dumps(body).encode("utf-8")
        for attempt in range(self.config.retries + 1):
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.config.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:300].decode("utf-8", "replace")
                if exc.code in RETRYABLE and attempt < self.config.retries:
                    time.sleep(_delay(exc.headers.get("Retry-After"), self.config.backoff * 2 ** attempt))
                    continue
                hint = {401: " (set --api-key-env to the variable holding a valid key)",
                        403: " (the key may not access this model)",
                        404: " (check --endpoint: the API base, e.g. http://host:8000/v1, and --model)"}
                tip = hint.get(exc.code, "")
                tried = f" after {attempt + 1} tries" if exc.code in RETRYABLE else ""
                raise EndpointError(f"{url} answered HTTP {exc.code}{tried}{tip}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                raise EndpointError(f"cannot reach {url}: {reason} (is the server running and --endpoint right?)") \
                    from None
            try:
                reply = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                raise EndpointError(f"{url} answered something that is not UTF-8 JSON: {raw[:100]!r}") from None
            if not isinstance(reply, dict):
                raise EndpointError(f"{url} answered JSON that is not an object: {raw[:100]!r}")
            return reply, attempt
        raise AssertionError("unreachable")  # pragma: no cover


def _delay(retry_after: str | None, default: float) -> float:
    """Seconds to wait: the server's Retry-After when it is a number (capped at 60 s), else `default`."""
    try:
        return min(max(float(retry_after), 0.0), 60.0) if retry_after else default
    except ValueError:
        return default
