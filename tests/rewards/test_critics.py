"""Critics: the local LM critic's score/confidence, the HTTP critic against a real loopback server
(serving a tiny local model in the chat-completions shape), and callable critics."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from grape_lightning.models.loading import load_causal_lm, load_tokenizer
from grape_lightning.rewards.critics import CallableCritic, Judgement, JudgeRequest, LocalLMCritic, OpenAICompatibleCritic
from tests.conftest import tiny_spec

REQUESTS = [JudgeRequest(f"{a}+{b}=", str(a + b + d), "correct", "Is the sum right?", str(a + b)) for a, b, d in [(1, 2, 0), (30, 4, 1), (7, 7, 0)]]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("critic_model")
    tokenizer = load_tokenizer(tiny_spec())
    load_causal_lm(tiny_spec(), tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


# -- local critic ------------------------------------------------------------------------------
def test_local_critic_score_and_confidence_follow_the_yes_no_probabilities(tiny_model_dir):
    critic = LocalLMCritic(tiny_model_dir, device="cpu")
    judgements = critic.judge(REQUESTS)
    model, tokenizer = critic._model, critic.tokenizer
    yes, no = tokenizer("y")["input_ids"][0], tokenizer("n")["input_ids"][0]
    for request, judgement in zip(REQUESTS, judgements):
        ids = torch.tensor([tokenizer(critic.prompt(request))["input_ids"]])
        probs = torch.softmax(model(ids).logits[0, -1].double(), -1)
        p_yes = float(probs[[yes, tokenizer("Y")["input_ids"][0]]].sum())
        p_no = float(probs[[no, tokenizer("N")["input_ids"][0]]].sum())
        assert judgement.score == pytest.approx(p_yes / (p_yes + p_no), abs=1e-6)
        assert judgement.confidence == pytest.approx(abs(p_yes - p_no), abs=1e-6)


def test_local_critic_confidence_extremes(tiny_model_dir):
    critic = LocalLMCritic(tiny_model_dir, device="cpu")
    critic.judge(REQUESTS[:1])  # loads the model
    hidden = critic._model.config.hidden_size
    vocab = critic._model.config.vocab_size
    head = torch.nn.Linear(hidden, vocab, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    critic._model.lm_head = head  # uniform next-token distribution: undecided, off-format
    uniform = critic.judge(REQUESTS[:1])[0]
    assert uniform.score == pytest.approx(0.5) and uniform.confidence == pytest.approx(0.0)
    with torch.no_grad():
        head.bias[critic.yes_ids[0]] = 30.0  # all mass on "yes"
    sure = critic.judge(REQUESTS[:1])[0]
    assert sure.score == pytest.approx(1.0) and sure.confidence == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        head.bias[critic.no_ids[0]] = 30.0  # yes and no tied: decisive format, no opinion
    torn = critic.judge(REQUESTS[:1])[0]
    assert torn.score == pytest.approx(0.5) and torn.confidence == pytest.approx(0.0, abs=1e-6)


# -- HTTP critic -------------------------------------------------------------------------------
class JudgeServer:
    """An OpenAI-compatible chat-completions server on loopback. The requested model name picks
    the behaviour: "tiny" judges with a tiny local model (LocalLMCritic on the user message),
    "slow" answers after 2 s, "error" always answers 500, "flaky" answers 500 once per request
    then succeeds, "garbage" answers text that is not JSON."""

    def __init__(self, model_dir):
        self.local = LocalLMCritic(model_dir, device="cpu")
        self.hits: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.seen: set[str] = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                behaviour = body["model"]
                with server.lock:
                    server.hits[behaviour] = server.hits.get(behaviour, 0) + 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self.respond(behaviour, body)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def respond(self, behaviour, body):
                user = body["messages"][-1]["content"]
                if behaviour == "slow":
                    time.sleep(2.0)
                    return  # the client gave up long ago
                if behaviour == "error" or (behaviour == "flaky" and user not in server.seen):
                    server.seen.add(user)
                    self.send_response(500)
                    self.end_headers()
                    return
                if behaviour == "garbage":
                    content = "I think it is fine."
                else:
                    time.sleep(0.05)
                    with server.lock:  # one forward pass at a time through the shared model
                        yes_no = server._judge_text(user)
                    content = json.dumps({"score": yes_no.score, "confidence": yes_no.confidence, "critique": yes_no.critique})
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def _judge_text(self, text):
        critic = self.local
        if critic._model is None:
            critic._load()
        ids = torch.tensor([critic.tokenizer(text + "\nAnswer yes or no:")["input_ids"]])
        probs = torch.softmax(critic._model(ids).logits[0, -1].float(), -1)
        yes, no = float(probs[critic.yes_ids].sum()), float(probs[critic.no_ids].sum())
        return Judgement(yes / (yes + no), abs(yes - no), f"P(yes)={yes:.3f}")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with JudgeServer(tiny_model_dir) as running:
        yield running


def test_http_critic_reads_the_served_model_judgements(server):
    critic = OpenAICompatibleCritic(server.url, "tiny", api_key_env=None, max_concurrency=2)
    judgements = critic.judge(REQUESTS * 2)
    for request, judgement in zip(REQUESTS * 2, judgements):
        expected = server._judge_text(judgement_user_text(critic, request))
        assert judgement.score == pytest.approx(expected.score, abs=1e-6)
        assert judgement.confidence == pytest.approx(expected.confidence, abs=1e-6)
        assert judgement.critique.startswith("P(yes)=")
    assert server.hits["tiny"] == len(REQUESTS)  # the repeats came from the cache
    assert server.max_in_flight <= 2
    assert critic.failures == {}


def judgement_user_text(critic, request):
    return critic.messages(request)[-1]["content"]


def test_http_critic_timeout_500_and_garbage_fail_softly(server):
    slow = OpenAICompatibleCritic(server.url, "slow", api_key_env=None, timeout=0.3, max_retries=1, backoff=0.05)
    assert slow.judge(REQUESTS[:1]) == [None] and slow.failures == {"timeout": 1}
    assert server.hits["slow"] == 2  # one try and one retry

    error = OpenAICompatibleCritic(server.url, "error", api_key_env=None, max_retries=2, backoff=0.01)
    assert error.judge(REQUESTS[:1]) == [None] and error.failures == {"http_500": 1}
    assert server.hits["error"] == 3  # one try and two bounded retries

    garbage = OpenAICompatibleCritic(server.url, "garbage", api_key_env=None, max_retries=2)
    assert garbage.judge(REQUESTS[:2]) == [None, None] and garbage.failures == {"malformed_judgement": 2}
    assert server.hits["garbage"] == 2  # a reply that is not a judgement is not retried

    flaky = OpenAICompatibleCritic(server.url, "flaky", api_key_env=None, max_retries=2, backoff=0.01)
    assert all(j is not None for j in flaky.judge(REQUESTS)) and flaky.failures == {}


def test_http_critic_disk_cache_survives_a_new_instance(server, tmp_path):
    cache = tmp_path / "judgements.jsonl"
    first = OpenAICompatibleCritic(server.url, "tiny", api_key_env=None, cache_path=str(cache))
    values = first.judge(REQUESTS)
    assert all(value is not None for value in values)
    second = OpenAICompatibleCritic(server.url, "tiny", api_key_env=None, cache_path=str(cache))
    hits = server.hits["tiny"]
    assert second.judge(REQUESTS) == values
    assert server.hits["tiny"] == hits


# -- callable critic ---------------------------------------------------------------------------
def length_judge(request):
    if request.response == "boom":
        raise RuntimeError("cannot judge")
    return (1.0 if len(request.response) <= 2 else 0.0, 0.9, "short" if len(request.response) <= 2 else "long")


def test_callable_critic_and_failures():
    critic = CallableCritic("tests.rewards.test_critics:length_judge")
    out = critic.judge([JudgeRequest("p", "12", "i", "q"), JudgeRequest("p", "1234", "i", "q"), JudgeRequest("p", "boom", "i", "q")])
    assert out[0] == Judgement(1.0, 0.9, "short") and out[1] == Judgement(0.0, 0.9, "long") and out[2] is None
