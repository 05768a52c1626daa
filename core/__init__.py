"""featurewire core: what an SAE stack is and how it runs on a host model.

Three subpackages, each importing only downwards: `core.host` (the host model runtime: loading,
hookpoints, hooks), `core.sae` (the SAE architectures) and `core.stack` (the stack format and its
runtime). The trainer and the service both build on this package; it imports neither. Importing
`core` itself (or `core.config`, `core.errors`, `core.stack.manifest`) never pulls in torch.
"""

__version__ = "0.1.0"
