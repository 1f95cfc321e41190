"""queueformer: a distributed job queue for Hugging Face transformer models.

``queueformer.contract`` is what every side agrees on, ``queueformer.server`` the stores the API and
workers share; this package's own modules are the client SDK (``Client``, ``bulk``) and the CLI, which
run on a base install (no Redis client, no torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from queueformer.contract import VERSION as __version__

if TYPE_CHECKING:
    from queueformer.client import Client

__all__ = ["Client", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Client":  # lazy: `import queueformer` stays cheap for workers and the API
        from queueformer.client import Client

        return Client
    raise AttributeError(name)
