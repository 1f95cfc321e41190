"""queueformer: a distributed job queue for Hugging Face transformer models.

This package is the light shared contract (job schemas, settings, storage, registry, errors), the
client SDK and the CLI. It never imports torch or transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from queueformer.client import Client

__all__ = ["Client", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Client":  # lazy: `import queueformer` stays cheap for workers and the API
        from queueformer.client import Client

        return Client
    raise AttributeError(name)
