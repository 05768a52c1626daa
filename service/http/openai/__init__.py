"""The OpenAI-compatible API on the HTTP port (`/openai/v1`): models, completions and chat completions with
steering, the default branch and per-token feature monitoring in a `featurewire` object (docs/api.md).

- `face`      the routes, mounted by the gateway, and the Generate calls over its loopback channel
- `fields`    the OpenAI body: fields read, neutral-only, ignored; unknown ones refused
- `steering`  the `featurewire` object: GenerateRequest's fields in the gateway's JSON vocabulary
- `chat`      messages to a prompt with the chat template
- `models`    model ids from GetServerInfo
- `choices`   Generate events to choices, chunks and whole responses
- `stream`    starting the calls; SSE chunks; cancellation when the client goes away
- `errors`    OpenAI's error JSON with the status from the one error table
"""
