"""The inference engine, in four roles (each a subpackage; imports `core`, never grpc or the server's config):

- `contract/`   the request contract, torch-free: plain request values and limits (`inputs`, `settings`), the
                specs and result events (`specs`, `feature_specs`, `encode_spec`), and the validators that turn
                the one into the other (`validation`, `search_validation`, `paging`). Where a request is checked.
- `execution/`  the one worker thread and its bounded queue (`engine`), continuous batching (`scheduler`) and
                the batched forward pass (`batch`). Where a request waits and is scheduled.
- `operations/` what each RPC computes on the worker: decompose, generation (with `text_stream`), interventions,
                score, search, features and dashboards, codes, activations. Where a request runs.
- `stacks/`     stacks as served: loaded, checked and self-checked for the host model (`served`), or as ONNX
                graphs for the activation-only server (`onnx_runtime`).
"""
