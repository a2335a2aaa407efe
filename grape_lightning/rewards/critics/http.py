"""A critic behind an OpenAI-compatible chat-completions endpoint (vLLM, SGLang, hosted judges)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from grape_lightning.rewards.critics.base import JUDGE_INSTRUCTIONS, Critic, Judgement, JudgeRequest, checked, judging_text

log = logging.getLogger(__name__)

_RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"


class OpenAICompatibleCritic(Critic):
    """POSTs ``{base_url}/chat/completions`` (with httpx) and reads ``{"score", "confidence",
    "critique"}`` JSON from the reply's message content (a ``` fence around it is accepted).

    - Each attempt is bounded by ``timeout`` seconds as a whole (connecting, sending, the server's
      wait and every byte of the reply), so a server that trickles bytes cannot hold a request
      longer. Up to ``max_retries`` retries follow, with back-off ``backoff * 2**attempt``, after a
      timeout, a transport failure (refused connection, a reply that is not HTTP) or a
      408/429/5xx answer; other 4xx answers are not retried.
    - At most ``max_concurrency`` requests are in flight.
    - Replies are cached by (model, messages): in memory, and in the JSON-lines file ``cache_path``
      when given, so a repeated judgement costs nothing. A cache line that does not parse (a run
      killed mid-write) is skipped, counted in ``corrupt_cache_lines`` and reported.
    - A request that still fails, or whose reply is not the expected JSON with values in [0, 1],
      gives None (GRAPE: confidence 0, counted). ``failures`` counts them by cause; a judging
      batch with failures logs a one-line summary to the console.

    The API key goes in an ``Authorization: Bearer`` header. It is read from the environment
    variable ``api_key_env`` when the config names one (then it is sent to that endpoint, whatever
    its scheme); otherwise from ``OPENAI_API_KEY``, and only to an ``https`` endpoint, so a key
    meant for a hosted service never travels in clear text to a local server.

    Args:
        base_url: the server's OpenAI-compatible API root, for example ``http://127.0.0.1:8000/v1``.
        model: model name sent with every request.
        api_key_env: environment variable holding the API key, sent to any endpoint (None:
            ``OPENAI_API_KEY``, sent to https endpoints only).
        timeout: seconds one attempt may take from connecting to the last byte of the reply.
        max_retries: retries after a timeout, a transport failure or a 408/429/5xx answer.
        backoff: seconds before the first retry; doubled for each further one.
        max_concurrency: most requests in flight at once.
        cache_path: JSON-lines file caching replies across runs (None: in memory only).
        temperature: sampling temperature requested from the judge.
        max_tokens: most tokens of the judge's reply.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 2,
        backoff: float = 0.5,
        max_concurrency: int = 8,
        cache_path: str | None = None,
        temperature: float = 0.0,
        max_tokens: int = 256,
    ) -> None:
        if timeout <= 0 or max_retries < 0 or max_concurrency < 1:
            raise ValueError(
                f"OpenAICompatibleCritic needs timeout > 0, max_retries >= 0 and max_concurrency >= 1, "
                f"got {timeout}, {max_retries}, {max_concurrency}"
            )
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_concurrency = max_concurrency
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.cache_path = Path(cache_path) if cache_path else None
        self._cache: dict[str, str] = {}
        self._lock = threading.Lock()
        self.failures: dict[str, int] = {}
        self.corrupt_cache_lines = 0
        self.requests = 0  # judgements asked for, cached ones included
        if self.cache_path is not None and self.cache_path.is_file():
            self._load_cache(self.cache_path)

    # -- the disk cache --------------------------------------------------------------------------
    def _load_cache(self, path: Path) -> None:
        corrupt = []
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                self._cache[str(entry["key"])] = str(entry["content"])
            except (ValueError, KeyError, TypeError):
                corrupt.append(number)
        self.corrupt_cache_lines = len(corrupt)
        if corrupt:
            shown = ", ".join(map(str, corrupt[:5])) + (", ..." if len(corrupt) > 5 else "")
            log.warning("%s: skipped %d corrupt cache line(s) (line %s); those requests will be sent again", path, len(corrupt), shown)

    def _append_cache(self, key: str, content: str) -> None:
        assert self.cache_path is not None
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.cache_path, "a+b") as handle:
            # a line cut short by a killed run must not swallow the next one
            handle.seek(0, os.SEEK_END)
            if handle.tell():
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    handle.write(b"\n")
            handle.write((json.dumps({"key": key, "content": content}) + "\n").encode())

    # -- requests --------------------------------------------------------------------------------
    def messages(self, request: JudgeRequest) -> list[dict[str, str]]:
        return [{"role": "system", "content": JUDGE_INSTRUCTIONS}, {"role": "user", "content": judging_text(request)}]

    def headers(self) -> dict[str, str]:
        """Request headers; the API key only as the class docstring says."""
        headers = {"Content-Type": "application/json"}
        if self.api_key_env is not None:
            key = os.environ.get(self.api_key_env)
        else:
            key = os.environ.get(DEFAULT_API_KEY_ENV) if urlsplit(self.url).scheme == "https" else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _count(self, cause: str) -> None:
        with self._lock:
            self.failures[cause] = self.failures.get(cause, 0) + 1

    async def _attempt(self, client: httpx.AsyncClient, body: dict[str, Any]) -> str:
        reply = await client.post(self.url, json=body, headers=self.headers())
        reply.raise_for_status()
        content = reply.json()["choices"][0]["message"]["content"]
        if not isinstance(content, str):
            raise TypeError(f"message content is {type(content).__name__}, not text")
        return content

    async def _post(self, client: httpx.AsyncClient, gate: asyncio.Semaphore, messages: list[dict[str, str]]) -> str | None:
        body = {"model": self.model, "messages": messages, "temperature": self.temperature, "max_tokens": self.max_tokens}
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                async with gate:
                    return await asyncio.wait_for(self._attempt(client, body), self.timeout)
            except httpx.HTTPStatusError as error:
                status = error.response.status_code
                cause, retry = f"http_{status}", status in _RETRYABLE_STATUS
            except (asyncio.TimeoutError, httpx.TimeoutException):
                cause, retry = "timeout", True
            except httpx.ConnectError:
                cause, retry = "connection", True
            except httpx.TransportError:  # not HTTP, connection dropped mid-reply, ...
                cause, retry = "bad_response", True
            except (ValueError, KeyError, IndexError, TypeError):
                cause, retry = "malformed_reply", False
            if not retry or attempt == self.max_retries:
                self._count(cause)
                return None
        return None

    def _key(self, request: JudgeRequest) -> str:
        return hashlib.sha256(json.dumps([self.model, self.messages(request)]).encode()).hexdigest()

    async def _judge_one(self, client: httpx.AsyncClient, gate: asyncio.Semaphore, request: JudgeRequest) -> Judgement | None:
        key = self._key(request)
        with self._lock:
            content = self._cache.get(key)
        if content is None:
            content = await self._post(client, gate, self.messages(request))
            if content is None:
                return None
            with self._lock:
                self._cache[key] = content
                if self.cache_path is not None:
                    self._append_cache(key, content)
        judgement = parse_judgement(content)
        if judgement is None:
            self._count("malformed_judgement")
        return judgement

    async def _judge_all(self, requests: list[JudgeRequest]) -> list[Judgement | None]:
        gate = asyncio.Semaphore(self.max_concurrency)
        # the timeout is enforced per attempt by asyncio.wait_for; httpx's own is only a backstop
        limits = httpx.Limits(max_connections=self.max_concurrency)
        async with httpx.AsyncClient(timeout=self.timeout, limits=limits) as client:
            return list(await asyncio.gather(*(self._judge_one(client, gate, request) for request in requests)))

    def judge(self, requests: list[JudgeRequest]) -> list[Judgement | None]:
        # Identical requests in one batch (a policy often repeats itself) are sent once.
        keys = [self._key(request) for request in requests]
        unique = dict(zip(keys, requests))
        before = sum(self.failures.values())
        judged = dict(zip(unique, _run(self._judge_all(list(unique.values())))))
        self.requests += len(unique)
        failed = sum(self.failures.values()) - before
        if failed:
            causes = ", ".join(f"{cause}: {count}" for cause, count in sorted(self.failures.items()))
            log.warning(
                "critic %s at %s: %d of %d judgements failed in this batch (scored with confidence 0); "
                "so far %d of %d (%s)", self.model, self.url, failed, len(unique), sum(self.failures.values()), self.requests, causes,
            )
        return [judged[key] for key in keys]


def _run(coroutine: Any) -> Any:
    """Run ``coroutine`` to completion from synchronous code, also when this thread already runs
    an event loop (a notebook): then in a fresh thread with its own loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    result: list[Any] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coroutine))
        except BaseException as error:  # noqa: BLE001 (re-raised in the caller's thread)
            errors.append(error)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def parse_judgement(content: str) -> Judgement | None:
    """``{"score", "confidence", "critique"}`` from a reply's text, or None if it is not that."""
    text = content.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
        text = text.rsplit("```", 1)[0]
    try:
        data: Any = json.loads(text)
        judgement = Judgement(score=data["score"], confidence=data["confidence"], critique=str(data.get("critique", "")))
    except (ValueError, KeyError, TypeError):
        return None
    return checked(judgement)
