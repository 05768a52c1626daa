"""Model ids: the bare host model and one `<model>:<stack>` per served stack, from GetServerInfo.

GetServerInfo goes over the loopback channel with the caller's metadata, so `GET /models` needs the same
token as any call. The list is cached once it has been read (a server's model and stacks never change while it
runs); a completion whose model is in the cache makes no extra call, and one whose model is not re-reads the
list with the caller's token before answering 404, so an unauthenticated caller learns nothing from it.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
from featurewire.v1 import featurewire_pb2 as pb

from service.http.openai.errors import OpenAIError, bad_request, from_rpc_error

NO_MODEL = "this server has no host model (serve --no-model): it cannot generate"
SEPARATOR = ":"


class Models:
    """The ids one server answers to, and the stack each selects ("" = the server's default, or none)."""

    def __init__(self, info: pb.GetServerInfoResponse, created: int) -> None:
        self.model = info.model.name
        self.created = created
        self.stacks = {s.name: s for s in info.stacks}
        self.ids: dict[str, str] = {}
        if self.model:
            self.ids[self.model] = ""
            self.ids.update({f"{self.model}{SEPARATOR}{name}": name for name in self.stacks})

    def entries(self) -> list[dict[str, Any]]:
        return [self.entry(model_id) for model_id in self.ids]

    def entry(self, model_id: str) -> dict[str, Any]:
        if model_id not in self.ids:
            raise self.not_found(model_id)
        stack = self.ids[model_id]
        extra: dict[str, Any] = {"model": self.model, "stack": stack}
        if stack:
            extra.update(stackDigest=self.stacks[stack].digest, stages=[s.name for s in self.stacks[stack].stages])
        return {"id": model_id, "object": "model", "created": self.created, "owned_by": "featurewire",
                "featurewire": extra}

    def not_found(self, model_id: str) -> OpenAIError:
        if not self.model:
            return OpenAIError(501, NO_MODEL, "model")
        listed = ", ".join(repr(i) for i in self.ids)
        return OpenAIError(404, f"the model {model_id!r} does not exist on this server; models: {listed}", "model",
                           "model_not_found")


class ModelCatalog:
    """GetServerInfo, read with each caller's metadata until one read succeeds, then kept."""

    def __init__(self) -> None:
        self._info: Any = None
        self._known: Models | None = None
        self._created = int(time.time())

    def bind(self, info_call: Any) -> None:
        self._info = info_call

    async def fetch(self, metadata: Any, timeout: float | None) -> Models:
        try:
            info = await self._info(pb.GetServerInfoRequest(), timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        self._known = Models(info, self._created)
        return self._known

    async def stack_for(self, model_id: str, stack: str, metadata: Any, timeout: float | None) -> str:
        """The stack a request runs on: the model id's, or `featurewire.stack` (which must then agree)."""
        models = self._known
        if models is None or model_id not in models.ids:
            models = await self.fetch(metadata, timeout)
        if model_id not in models.ids:
            raise models.not_found(model_id)
        chosen = models.ids[model_id]
        if stack and chosen and stack != chosen:
            raise bad_request(f"featurewire.stack {stack!r} contradicts the model {model_id!r} (stack {chosen!r}); "
                              f"send one of them, or model {models.model!r} with featurewire.stack", "featurewire")
        return stack or chosen
