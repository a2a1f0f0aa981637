"""The REST API of ``sagakit serve``: :func:`create_api` builds a FastAPI app over an App.

Needs the ``api`` extra (``pip install sagakit[api]``).
"""

from __future__ import annotations

from sagakit.api.app import create_api

__all__ = ["create_api"]
