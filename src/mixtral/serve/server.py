"""The OpenAI-compatible HTTP API over the batching engine (FastAPI + uvicorn).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with ``stream`` and ``n``;
completions also take a batch of prompts), ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``.
Request handlers run on uvicorn's event loop; they tokenize, submit one engine ``Request`` per choice
and turn their events into an OpenAI response or SSE chunks.
Errors use OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``, with a 4xx status.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generation import SamplingParams
from .chat import chat_prompt
from .engine import Delta, Engine, Event, Failed, Finished
from .engine import Request as EngineRequest

log = logging.getLogger("mixtral.serve")


# -- request bodies: the fields OpenAI clients send; unknown fields are ignored, as OpenAI does -------
# torch.Generator.manual_seed takes 64 bits, signed or not; a larger seed would be a 500, not a 400.
SEED_RANGE = dict(ge=-(2**63), le=2**64 - 1)
MAX_N = 128  # choices per prompt; each is its own engine request
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for /v1/completions


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, **SEED_RANGE)
    stream: bool | None = False  # clients built from OpenAI's schema send null for unset fields
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=MAX_N)
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


class ContentPart(BaseModel):
    """One part of a message's content list; only ``text`` parts are read (see ``message_text``)."""
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


def message_text(messages: list[Message]) -> list[dict[str, str]]:
    """The conversation as the chat template takes it: text parts joined by newlines, as vLLM does;
    any other part (image, audio, file) is a 400 since this model reads text only."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text":
                    raise APIError(400, f"'{part.type}' content parts are not supported; this model reads text "
                                   "only", param=f"messages.{i}.content.{j}", code="unsupported_content")
                if part.text is None:
                    raise APIError(400, "a text content part needs 'text'", param=f"messages.{i}.content.{j}",
                                   code="invalid_value")
            content = "\n".join(p.text for p in content)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
    return out


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
    # one prompt (text or token ids) or a batch of them; each gets ``n`` choices
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    def _defaults(self) -> dict[str, bool]:
        return {**super()._defaults(), "suffix": self.suffix is None, "best_of": self.best_of in (None, 1)}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"We could not parse the JSON body of your request: {first.get('msg')}",
                        code="invalid_json")
    # A value that matches no member of a union (``prompt``, ``content``) gives one error per member,
    # each located under the member's name ("prompt.str", "prompt.list[int]"); the param is where
    # those locations agree.
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    for e in errors[1:]:
        other = [str(p) for p in e.get("loc", ()) if p != "body"]
        if other[:1] == loc[:1]:
            loc = [a for a, _ in itertools.takewhile(lambda ab: ab[0] == ab[1], zip(loc, other))]
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
    _add_error_handlers(app)
    _add_model_routes(app, engine, model_name)
    _add_completion_routes(app, engine, model_name)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answered in OpenAI's body: ours, request validation's, and Starlette's."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = _validation_error(exc)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Unknown routes (404) and wrong methods (405) in OpenAI's error body, not FastAPI's."""
        err = APIError(exc.status_code, str(exc.detail), type="invalid_request_error" if exc.status_code < 500
                       else "server_error")
        return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)


def _add_model_routes(app: FastAPI, engine: Engine, model_name: str) -> None:
    """``/health``, ``/v1/models`` and ``/v1/models/{id}``."""
    card = {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "mixtral",
            "max_model_len": engine.max_context}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "active": engine.num_active, "max_batch": engine.max_batch}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")  # ":path": served names may contain "/" (org/model)
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != model_name:
            raise _unknown_model(model_id, model_name)
        return card


def _add_completion_routes(app: FastAPI, engine: Engine, model_name: str) -> None:
    """``/v1/chat/completions`` and ``/v1/completions``: each turns its body into token-id prompts and
    a token budget, then hands them to ``_complete``."""
    tokenizer = engine.tokenizer

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        _check(body, model_name)
        try:
            prompt_ids = chat_prompt(tokenizer, message_text(body.messages))
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        if body.max_completion_tokens is not None:
            max_tokens = _MaxTokens(body.max_completion_tokens, "max_completion_tokens")
        else:
            max_tokens = _MaxTokens(body.max_tokens, "max_tokens")
        return await _complete(engine, body, request, [prompt_ids], max_tokens, model_name, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        _check(body, model_name)
        batch = _prompt_batch(body.prompt)
        prompts = _prompt_ids(tokenizer, batch, engine.model.config.vocab_size)
        echo = None
        if body.echo:  # the prompt's text as given, or its tokens' text
            echo = [p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=True) for p in batch]
        max_tokens = _MaxTokens(body.max_tokens, "max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS)
        return await _complete(engine, body, request, prompts, max_tokens, model_name, chat=False, echo=echo)


def _check(body: _Body, model_name: str) -> None:
    """A 404 for another model's name, a 400 for a field this server does not honour."""
    if body.model != model_name:
        raise _unknown_model(body.model, model_name)
    field = body.unsupported()
    if field is not None:
        raise APIError(400, f"'{field}' is not supported by this server; leave it out or at its default",
                       param=field, code="unsupported_parameter")


def _unknown_model(name: str, model_name: str) -> APIError:
    return APIError(404, f"The model '{name}' does not exist; this server serves '{model_name}'.",
                    param="model", code="model_not_found")


def _prompt_batch(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str] | list[list[int]]:
    """A completions ``prompt`` as a batch: one text or one list of token ids is a batch of one."""
    batch = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
    if not batch:
        raise APIError(400, "the prompt is empty", param="prompt")
    return batch


def _prompt_ids(tokenizer: Any, batch: list[str] | list[list[int]], vocab: int) -> list[list[int]]:
    """Each prompt's token ids: texts are encoded, token ids checked against the vocabulary."""
    prompts = []
    for p in batch:
        if isinstance(p, str):
            prompts.append(tokenizer.encode(p))
        elif any(not 0 <= t < vocab for t in p):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        else:
            prompts.append(list(p))
    return prompts


@dataclass
class _MaxTokens:
    value: int | None  # as the client sent it
    param: str  # the field it came in ("max_tokens" or "max_completion_tokens"), for errors
    default: int | None = None  # when not sent; None: the rest of the context

    def resolve(self, prompt_len: int, limit: int, chat: bool) -> int:
        """The token budget for one prompt; a 400 like vLLM's if it cannot fit."""
        where = "messages" if chat else "prompt"
        if self.value is not None and self.value < 1:
            raise APIError(400, f"{self.param} must be at least 1, got {self.value}", param=self.param,
                           code="invalid_value")
        if prompt_len >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your request "
                           f"has {prompt_len} input tokens. Please reduce the length of the {where}.",
                           param=where, code="context_length_exceeded")
        if self.value is not None and prompt_len + self.value > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                           f"{prompt_len + self.value} tokens ({prompt_len} in the {where}, {self.value} in the "
                           f"completion). Please reduce the length of the {where} or completion.",
                           param=where, code="context_length_exceeded")
        if self.value is not None:
            return self.value
        return min(self.default or limit, limit - prompt_len)


async def _complete(engine: Engine, body: _Body, http: Request, prompts: list[list[int]], max_tokens: _MaxTokens,
                    model_name: str, chat: bool, echo: list[str] | None = None):
    """Run ``n`` engine requests per prompt (choice ``i * n + j`` is prompt i's j-th) and answer with
    one response, or one SSE stream that interleaves the choices' chunks."""
    n = body.n or 1
    budgets = _budgets(prompts, max_tokens, engine.max_context, chat)
    events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
    reqs = _engine_requests(body, prompts, budgets, n, asyncio.get_running_loop(), events)
    _submit(engine, reqs)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    prompt_tokens = sum(len(ids) for ids in prompts)  # once per prompt, however many choices (as vLLM)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _stream(reqs, events, rid, created, model_name, chat, include_usage, n, echo, prompt_tokens)
        return StreamingResponse(chunks, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    collected = await _collect(reqs, events, http, echo, n)
    if collected is None:
        return JSONResponse({}, status_code=499)
    texts, finals = collected
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model_name, "choices": _choices(texts, finals, chat),
            "usage": _usage(prompt_tokens, sum(f.completion_tokens for f in finals))}


def _budgets(prompts: list[list[int]], max_tokens: _MaxTokens, limit: int, chat: bool) -> list[int]:
    """Each prompt's token budget; a 400 for an empty prompt or one that cannot fit."""
    budgets = []
    for ids in prompts:
        if not ids:
            raise APIError(400, "the prompt is empty", param="messages" if chat else "prompt")
        budgets.append(max_tokens.resolve(len(ids), limit, chat))
    return budgets


def _engine_requests(body: _Body, prompts: list[list[int]], budgets: list[int], n: int,
                     loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> list[EngineRequest]:
    """``n`` engine requests per prompt, each posting its events to ``events`` with its choice index."""
    temperature = 1.0 if body.temperature is None else body.temperature
    params = SamplingParams(do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0,
                            top_p=body.top_p)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    reqs: list[EngineRequest] = []
    for ids, budget in zip(prompts, budgets):
        for j in range(n):
            # the j-th choice samples from seed + j: with a seed, all n differ and each is reproducible
            seed = body.seed if body.seed is None or j == 0 else (body.seed + j) % 2**64
            emit = functools.partial(_post, loop, events, len(reqs))
            reqs.append(EngineRequest(ids, budget, params, seed, stop, emit=emit,
                                      frequency_penalty=body.frequency_penalty or 0.0,
                                      presence_penalty=body.presence_penalty or 0.0))
    return reqs


def _submit(engine: Engine, reqs: list[EngineRequest]) -> None:
    """All of the requests or none: if the engine refuses one (it is shutting down), a 503."""
    try:
        for r in reqs:
            engine.submit(r)
    except RuntimeError as e:
        for r in reqs:
            r.cancel()
        raise APIError(503, str(e), type="server_error") from e


async def _collect(reqs: list[EngineRequest], events: asyncio.Queue, http: Request, echo: list[str] | None,
                   n: int) -> tuple[list[list[str]], list[Finished]] | None:
    """Every choice's text pieces and its ``Finished``; None if the client went away first."""
    texts: list[list[str]] = [[] if echo is None else [echo[i // n]] for i in range(len(reqs))]
    finals: list[Finished | Failed | None] = [None] * len(reqs)
    pending = len(reqs)
    try:
        while pending:
            try:
                i, event = await asyncio.wait_for(events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    return None
                continue
            if isinstance(event, Delta):
                texts[i].append(event.text)
            elif isinstance(event, Failed):
                raise APIError(503 if "shutting down" in event.message else 500, event.message, type="server_error")
            else:
                finals[i], pending = event, pending - 1
    finally:
        for r in reqs:
            r.cancel()  # a no-op once finished; frees the slots if this handler failed or was cancelled
    return texts, finals


def _choices(texts: list[list[str]], finals: list[Finished], chat: bool) -> list[dict[str, Any]]:
    """The response's choices, in OpenAI's chat or completions shape."""
    choices = []
    for i, (text, final) in enumerate(zip(texts, finals)):
        content = "".join(text)
        if chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": content},
                            "logprobs": None, "finish_reason": final.reason})
        else:
            choices.append({"index": i, "text": content, "logprobs": None, "finish_reason": final.reason})
    return choices


def _post(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, index: int, event: Event) -> None:
    """An engine request's ``emit``: hand (choice index, event) to the handler's queue (engine thread)."""
    loop.call_soon_threadsafe(events.put_nowait, (index, event))


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _stream(reqs: list[EngineRequest], events: asyncio.Queue, rid: str, created: int, model_name: str,
                  chat: bool, include_usage: bool, n: int, echo: list[str] | None,
                  prompt_tokens: int) -> AsyncIterator[str]:
    """SSE in OpenAI's chunk format: per choice, (chat) a first chunk with the role, content deltas,
    a chunk with its finish_reason; then, with include_usage, one chunk with usage and no choices
    (every other chunk carries ``"usage": null``, as OpenAI's do); then ``[DONE]``. If the client goes
    away, Starlette cancels this generator and ``finally`` tells the engine, which drops the requests
    at its next step."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    usage = {"usage": None} if include_usage else {}

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        data = {"id": rid, "object": obj, "created": created, "model": model_name, "choices": choices,
                **usage, **extra}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def choice(i: int, text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if not chat:
            return {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}

    try:
        for i in range(len(reqs)):
            if chat:
                yield chunk([choice(i, "", None, role=True)])
            elif echo is not None:
                yield chunk([choice(i, echo[i // n], None)])
        pending, completion_tokens = len(reqs), 0
        while pending:
            i, event = await events.get()
            if isinstance(event, Delta):
                yield chunk([choice(i, event.text, None)])
            elif isinstance(event, Finished):
                yield chunk([choice(i, None if chat else "", event.reason)])
                pending, completion_tokens = pending - 1, completion_tokens + event.completion_tokens
            else:
                body = APIError(500, event.message, type="server_error").body()
                yield f"data: {json.dumps(body)}\n\n"
                break
        if not pending and include_usage:
            yield chunk([], usage=_usage(prompt_tokens, completion_tokens))
        yield "data: [DONE]\n\n"
    finally:
        for r in reqs:
            r.cancel()
