"""The OpenAI-compatible HTTP API over the batching engine (FastAPI + uvicorn).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with ``stream``),
``GET /v1/models``, ``GET /health``. Request handlers run on uvicorn's event loop; they tokenize,
submit a ``Request`` to the engine and turn its events into an OpenAI response or SSE chunks.
Errors use OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``, with a 4xx status.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..generation import SamplingParams
from .engine import Delta, Engine, Event, Failed, Finished
from .engine import Request as EngineRequest

log = logging.getLogger("mixtral.serve")

SHUTDOWN_GRACE_S = 10.0  # on SIGINT/SIGTERM, in-flight requests get this long to finish, then are cancelled


# -- request bodies: the fields OpenAI clients send; unknown fields are ignored, as OpenAI does -------
# torch.Generator.manual_seed takes 64 bits, signed or not; a larger seed would be a 500, not a 400.
SEED_RANGE = dict(ge=-(2**63), le=2**64 - 1)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, **SEED_RANGE)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    # OpenAI fields this server does not implement, declared so that a value other than the
    # default can be refused (see ``unsupported``) instead of answered as if it had been honoured.
    logprobs: Any = None
    logit_bias: Any = None

    def unsupported(self) -> str | None:
        """The first field asking for something this server does not do, or None."""
        return next((name for name, honoured in self._defaults().items() if not honoured), None)

    def _defaults(self) -> dict[str, bool]:
        """Each unimplemented field: whether its value is one this server honours by ignoring it."""
        # (``is False``: the completions API's logprobs=0 still asks for the sampled tokens' logprobs)
        return {"logprobs": self.logprobs is None or self.logprobs is False, "logit_bias": not self.logit_bias}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None  # the newer name for max_tokens
    top_logprobs: Any = None
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None  # the older names of tools and tool_choice
    function_call: Any = None

    def _defaults(self) -> dict[str, bool]:
        fmt = self.response_format
        return {**super()._defaults(), "top_logprobs": self.top_logprobs in (None, 0),
                "response_format": fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"),
                "tools": not self.tools, "tool_choice": self.tool_choice in (None, "none"),
                "functions": not self.functions, "function_call": self.function_call in (None, "none")}


class CompletionBody(_Body):
    prompt: str | list[str] | list[int]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    def _defaults(self) -> dict[str, bool]:
        return {**super()._defaults(), "echo": not self.echo, "suffix": self.suffix is None,
                "best_of": self.best_of in (None, 1)}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _validation_error(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"We could not parse the JSON body of your request: {first.get('msg')}",
                        code="invalid_json")
    param = ".".join(loc) or None
    return APIError(400, f"Invalid value for '{param}': {first.get('msg')}" if param else first.get("msg", ""),
                    param=param, code="invalid_value")


# -- the app --------------------------------------------------------------------------------------------
def create_app(engine: Engine, model_name: str) -> FastAPI:
    """The FastAPI app; starts the engine thread on startup and stops it on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="mixtral", lifespan=lifespan)
    created = int(time.time())
    tokenizer = engine.tokenizer

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = _validation_error(exc)
        return JSONResponse(err.body(), status_code=err.status)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "active": engine.num_active, "max_batch": engine.max_batch}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "mixtral",
             "max_model_len": engine.max_context},
        ]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        _check_model(body)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await _complete(engine, body, request, prompt_ids, max_tokens, model_name, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        _check_model(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_ids = tokenizer.encode(prompt)
        else:
            vocab = engine.model.config.vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            prompt_ids = list(prompt)
        return await _complete(engine, body, request, prompt_ids, body.max_tokens, model_name, chat=False)

    def _check_model(body: _Body) -> None:
        if body.model != model_name:
            raise APIError(404, f"The model '{body.model}' does not exist; this server serves '{model_name}'.",
                           param="model", code="model_not_found")
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        field = body.unsupported()
        if field is not None:
            raise APIError(400, f"'{field}' is not supported by this server; leave it out or at its default",
                           param=field, code="unsupported_parameter")

    return app


async def _complete(engine: Engine, body: _Body, http: Request, prompt_ids: list[int], max_tokens: int | None,
                    model_name: str, chat: bool):
    if not prompt_ids:
        raise APIError(400, "the prompt is empty", param="prompt" if not chat else "messages")
    n, limit = len(prompt_ids), engine.max_context
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens",
                       code="invalid_value")
    if n >= limit or (max_tokens is not None and n + max_tokens > limit):
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                       f"{n + (max_tokens or 0)} tokens ({n} in the prompt, {max_tokens or 0} for the completion). "
                       "Please reduce the length of the prompt or the completion.",
                       param="messages" if chat else "prompt", code="context_length_exceeded")
    temperature = 1.0 if body.temperature is None else body.temperature
    params = SamplingParams(do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0,
                            top_p=body.top_p)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    req = EngineRequest(prompt_ids, max_tokens or limit - n, params, body.seed, stop,
                        emit=lambda e: loop.call_soon_threadsafe(events.put_nowait, e),
                        frequency_penalty=body.frequency_penalty or 0.0,
                        presence_penalty=body.presence_penalty or 0.0)
    try:
        engine.submit(req)
    except RuntimeError as e:
        raise APIError(503, str(e), type="server_error") from e
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _stream(req, events, rid, created, model_name, chat, include_usage)
        return StreamingResponse(chunks, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    text, final = [], None
    try:
        while final is None:
            try:
                event = await asyncio.wait_for(events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    return JSONResponse({}, status_code=499)
                continue
            if isinstance(event, Delta):
                text.append(event.text)
            else:
                final = event
    finally:
        req.cancel()  # a no-op once finished; frees the slot if this handler was cancelled
    if isinstance(final, Failed):
        raise APIError(503 if "shutting down" in final.message else 500, final.message, type="server_error")
    content = "".join(text)
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": content},
                  "logprobs": None, "finish_reason": final.reason}
    else:
        choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": final.reason}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model_name, "choices": [choice], "usage": _usage(final)}


def _usage(f: Finished) -> dict[str, int]:
    return {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
            "total_tokens": f.prompt_tokens + f.completion_tokens}


async def _stream(req: EngineRequest, events: asyncio.Queue, rid: str, created: int, model_name: str,
                  chat: bool, include_usage: bool) -> AsyncIterator[str]:
    """SSE in OpenAI's chunk format. If the client goes away, Starlette cancels this generator and
    ``finally`` tells the engine, which drops the request at its next step."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        data = {"id": rid, "object": obj, "created": created, "model": model_name, "choices": choices, **extra}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def choice(text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if not chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    try:
        if chat:
            yield chunk([choice("", None, role=True)])
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                yield chunk([choice(event.text, None)])
            elif isinstance(event, Finished):
                yield chunk([choice(None if chat else "", event.reason)])
                if include_usage:
                    yield chunk([], usage=_usage(event))
                break
            else:
                body = APIError(500, event.message, type="server_error").body()
                yield f"data: {json.dumps(body)}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        req.cancel()


# -- the command ----------------------------------------------------------------------------------------
def run_serve(args) -> int:
    """``mixtral serve``: load the model, start the engine, serve until SIGINT/SIGTERM."""
    import signal
    import sys

    import uvicorn

    from ..cli import load_for_cli, resolve_model
    from ..perf import configure_threads

    configure_threads(args.threads)
    path = resolve_model(args.model)
    model, tokenizer = load_for_cli(path, args.dtype, args.quantize)
    if args.model is None:
        from ..demo import DEMO_NOTICE

        print(DEMO_NOTICE, file=sys.stderr)
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_context=args.max_context)
    name = args.served_model_name or path.resolve().name
    app = create_app(engine, name)
    print(f"serving '{name}' at http://{args.host}:{args.port}/v1 (max batch {engine.max_batch}, "
          f"context {engine.max_context})", file=sys.stderr, flush=True)
    # uvicorn installs its own SIGINT/SIGTERM handlers while it runs: it stops accepting, lets in-flight
    # requests finish for SHUTDOWN_GRACE_S, cancels the rest, then the lifespan hook stops the engine.
    # Afterwards it re-raises the signal against the handlers it found; these note it so that a clean
    # shutdown exits 0 instead of dying by the signal.
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda sig, frame: caught.append(sig))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info",
                    timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        print(f"stopped by {signal.Signals(caught[0]).name}", file=sys.stderr)
    return 0
