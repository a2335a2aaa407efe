"""OpenAICompatibleCritic against judges that misbehave: replies that are not HTTP, a server that
trickles its reply, a corrupt disk cache, where the API key may go, and the console summary. Every
server listens on 127.0.0.1 and every request is bounded by a short timeout."""

from __future__ import annotations

import json
import logging
import socket
import socketserver
import threading
import time

import yaml

from grape_lightning.rewards.critics import JudgeRequest, OpenAICompatibleCritic
from tests.cli_runner import ROOT, run_grape

REQUEST = JudgeRequest("1+2=", "3", "correct", "Is the sum right?", "3")
JUDGEMENT = {"score": 0.75, "confidence": 0.5, "critique": "fine"}


def _reply(content: dict = JUDGEMENT) -> bytes:
    body = json.dumps({"choices": [{"message": {"role": "assistant", "content": json.dumps(content)}}]}).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body


class _Threading(socketserver.ThreadingTCPServer):
    daemon_threads = True  # a handler still trickling to a client that left does not hold up the test


class RawServer:
    """A TCP server on 127.0.0.1 whose ``behaviour(connection, request_bytes)`` writes whatever it
    likes back; ``requests`` keeps every request it read (headers and body)."""

    def __init__(self, behaviour):
        self.requests: list[bytes] = []
        server = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                self.request.settimeout(5)
                data = b""
                try:
                    while b"\r\n\r\n" not in data:
                        data += self.request.recv(65536)
                    head, _, body = data.partition(b"\r\n\r\n")
                    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0)
                    while len(body) < length:
                        body += self.request.recv(65536)
                except OSError:
                    return
                server.requests.append(head + b"\r\n\r\n" + body)
                try:
                    behaviour(self.request)
                except OSError:  # the client gave up
                    pass

        self.tcp = _Threading(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.tcp.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.tcp.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.tcp.shutdown()
        self.tcp.server_close()


def not_http(connection: socket.socket) -> None:
    connection.sendall(b"SSH-2.0-OpenSSH_9.6\r\nthis is not an HTTP reply\r\n\r\n")


def good(connection: socket.socket) -> None:
    connection.sendall(_reply())


def trickle(connection: socket.socket) -> None:
    """A complete, valid reply, one byte every 20 ms (a few seconds in all): each read gets data
    well within any per-read timeout."""
    for byte in _reply():
        connection.sendall(bytes([byte]))
        time.sleep(0.02)


def test_a_reply_that_is_not_http_is_a_counted_failure_not_a_crash():
    with RawServer(not_http) as server:
        critic = OpenAICompatibleCritic(server.url, "judge", timeout=2.0, max_retries=1, backoff=0.01)
        assert critic.judge([REQUEST]) == [None]
    assert critic.failures == {"bad_response": 1}
    assert len(server.requests) == 2  # one try, one bounded retry


def test_timeout_bounds_the_whole_request_against_a_trickling_server():
    with RawServer(trickle) as server:
        # trickled to the end, the reply is a valid judgement: getting None proves the request was cut
        critic = OpenAICompatibleCritic(server.url, "judge", timeout=0.5, max_retries=0)
        assert critic.judge([REQUEST]) == [None]
        assert critic.failures == {"timeout": 1}
    with RawServer(good) as server:  # the same reply at once is accepted
        judged = OpenAICompatibleCritic(server.url, "judge", timeout=2.0).judge([REQUEST])[0]
        assert (judged.score, judged.confidence, judged.critique) == (0.75, 0.5, "fine")


def test_a_corrupt_cache_line_is_skipped_counted_and_reported(tmp_path, caplog):
    cache = tmp_path / "judge_cache.jsonl"
    with RawServer(good) as server:
        first = OpenAICompatibleCritic(server.url, "judge", cache_path=str(cache))
        other = JudgeRequest("2+2=", "4", "correct", "Is the sum right?", "4")
        first.judge([REQUEST, other])
        assert len(server.requests) == 2
        lines = cache.read_text().splitlines()
        # the second entry is garbled, then a line cut short by a killed run
        cache.write_text(lines[0] + "\n" + "{not json\n" + lines[1][: len(lines[1]) // 2])
        with caplog.at_level(logging.WARNING):
            second = OpenAICompatibleCritic(server.url, "judge", cache_path=str(cache))
        assert second.corrupt_cache_lines == 2
        assert f"{cache}: skipped 2 corrupt cache line(s) (line 2, 3)" in caplog.text
        judged = second.judge([REQUEST, other])
        assert all(j is not None for j in judged)
        assert len(server.requests) == 3  # REQUEST came from the cache; `other` was asked again
    third = OpenAICompatibleCritic(server.url, "judge", cache_path=str(cache))
    assert third.corrupt_cache_lines == 2 and len(third._cache) == 2  # the new entry did not merge into the cut line


def _authorization(request: bytes) -> str | None:
    for line in request.split(b"\r\n"):
        if line.lower().startswith(b"authorization:"):
            return line.split(b":", 1)[1].strip().decode()
    return None


def test_the_api_key_goes_only_to_https_or_where_the_config_names_its_variable(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-hosted")
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-local")
    with RawServer(good) as server:
        OpenAICompatibleCritic(server.url, "judge").judge([REQUEST])
        OpenAICompatibleCritic(server.url, "judge", api_key_env="MY_JUDGE_KEY").judge([REQUEST, JudgeRequest("p", "r", "i", "q")])
    assert [_authorization(request) for request in server.requests] == [None, "Bearer sk-local", "Bearer sk-local"]
    assert OpenAICompatibleCritic("https://judge.example/v1", "judge").headers()["Authorization"] == "Bearer sk-hosted"
    assert "Authorization" not in OpenAICompatibleCritic("http://judge.example/v1", "judge").headers()


def test_failures_are_summarised_on_the_console(caplog):
    with RawServer(not_http) as server, caplog.at_level(logging.WARNING):
        critic = OpenAICompatibleCritic(server.url, "judge", timeout=2.0, max_retries=0)
        critic.judge([REQUEST, JudgeRequest("p", "r", "i", "q")])
    assert f"critic judge at {server.url}/chat/completions: 2 of 2 judgements failed in this batch" in caplog.text
    assert "(bad_response: 2)" in caplog.text


def test_grape_fit_with_a_judge_that_answers_garbage_finishes_and_says_so(tmp_path):
    """The user's path: the quickstart config with its critic pointed at a broken server."""
    with RawServer(not_http) as server:
        override = {
            "trainer": {"max_steps": 1, "val_check_interval": 1, "log_every_n_steps": 1, "callbacks": []},
            "model": {"init_args": {
                "rubric": str(ROOT / "configs/rubrics/arithmetic.yaml"),
                "critics": {"local": {"class_path": "grape_lightning.rewards.critics.OpenAICompatibleCritic",
                                      "init_args": {"base_url": server.url, "model": "judge", "timeout": 2.0, "max_retries": 0}}},
            }},
            "data": {"init_args": {"task": {"init_args": {"num_train": 16, "num_val": 8}}, "batch_size": 2, "group_size": 2}},
        }
        (tmp_path / "override.yaml").write_text(yaml.safe_dump(override))
        result = run_grape("fit", "--config", str(ROOT / "configs/grape.yaml"), "--config", "override.yaml", cwd=tmp_path)
    assert "judgements failed in this batch" in result.stderr
    assert "(bad_response: " in result.stderr
    assert server.requests  # the critic did ask
