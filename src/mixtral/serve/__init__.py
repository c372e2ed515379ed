"""Serving: the continuous-batching engine, the OpenAI-compatible server and chat prompts.

``engine`` needs only torch; ``server`` needs fastapi/uvicorn, imported only when it is used (the
``mixtral serve`` command is ``mixtral.cli.serve``).
"""

from ..cache import RaggedDecodeView  # defined beside KVCache since the decode kernels take it too
from .engine import Delta, Engine, Failed, Finished, Request

__all__ = ["Delta", "Engine", "Failed", "Finished", "RaggedDecodeView", "Request"]
