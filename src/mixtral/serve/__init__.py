"""Serving: the continuous-batching engine, the OpenAI-compatible server, terminal chat and benchmarks.

``engine`` needs only torch; ``server`` needs fastapi/uvicorn, imported only when it is used.
"""

from .engine import Delta, Engine, Failed, Finished, RaggedDecodeView, Request

__all__ = ["Delta", "Engine", "Failed", "Finished", "RaggedDecodeView", "Request"]
