"""A critic behind an OpenAI-compatible chat-completions endpoint (vLLM, SGLang, hosted judges)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from grape_lightning.rewards.critics.base import JUDGE_INSTRUCTIONS, Critic, Judgement, JudgeRequest, checked, judging_text

_RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


class OpenAICompatibleCritic(Critic):
    """POSTs ``{base_url}/chat/completions`` and reads ``{"score", "confidence", "critique"}`` JSON
    from the reply's message content (a ``` fence around it is accepted).

    - ``timeout`` seconds per attempt; up to ``max_retries`` retries with back-off
      ``backoff * 2**attempt`` after a timeout, a connection error or a 408/429/5xx answer (other
      4xx answers are not retried);
    - at most ``max_concurrency`` requests in flight;
    - replies are cached by (model, messages): in memory, and in the JSON-lines file
      ``cache_path`` when given, so a repeated judgement costs nothing;
    - a request that still fails, or whose reply is not the expected JSON with values in [0, 1],
      gives None (GRAPE: confidence 0, counted). ``failures`` counts them by cause.

    The API key, if any, is read from the environment variable ``api_key_env``.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 30.0,
        max_retries: int = 2,
        backoff: float = 0.5,
        max_concurrency: int = 8,
        cache_path: str | None = None,
        temperature: float = 0.0,
        max_tokens: int = 256,
    ) -> None:
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
        if self.cache_path is not None and self.cache_path.is_file():
            for line in self.cache_path.read_text().splitlines():
                entry = json.loads(line)
                self._cache[entry["key"]] = entry["content"]

    def messages(self, request: JudgeRequest) -> list[dict[str, str]]:
        return [{"role": "system", "content": JUDGE_INSTRUCTIONS}, {"role": "user", "content": judging_text(request)}]

    def _count(self, cause: str) -> None:
        with self._lock:
            self.failures[cause] = self.failures.get(cause, 0) + 1

    def _post(self, messages: list[dict[str, str]]) -> str | None:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature, "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(urllib.request.Request(self.url, body, headers), timeout=self.timeout) as reply:
                    return json.loads(reply.read())["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as error:
                cause, retry = f"http_{error.code}", error.code in _RETRYABLE_STATUS
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                cause, retry = "timeout" if "timed out" in str(error) else "connection", True
            except (ValueError, KeyError, IndexError, TypeError):
                cause, retry = "malformed_reply", False
            if not retry or attempt == self.max_retries:
                self._count(cause)
                return None
        return None

    def _key(self, request: JudgeRequest) -> str:
        return hashlib.sha256(json.dumps([self.model, self.messages(request)]).encode()).hexdigest()

    def _judge_one(self, request: JudgeRequest) -> Judgement | None:
        messages = self.messages(request)
        key = self._key(request)
        with self._lock:
            content = self._cache.get(key)
        if content is None:
            content = self._post(messages)
            if content is None:
                return None
            with self._lock:
                self._cache[key] = content
                if self.cache_path is not None:
                    self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                    with open(self.cache_path, "a") as handle:
                        handle.write(json.dumps({"key": key, "content": content}) + "\n")
        judgement = parse_judgement(content)
        if judgement is None:
            self._count("malformed_judgement")
        return judgement

    def judge(self, requests: list[JudgeRequest]) -> list[Judgement | None]:
        # Identical requests in one batch (a policy often repeats itself) are sent once.
        keys = [self._key(request) for request in requests]
        unique = {key: request for key, request in zip(keys, requests)}
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            judged = dict(zip(unique, pool.map(self._judge_one, unique.values())))
        return [judged[key] for key in keys]


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
