"""The endpoint engine: its requests, retries and errors against small local HTTP servers that
misbehave on purpose (the real vLLM server's tests are in test_vllm.py)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mechlens import Sampling
from mechlens.rollouts import EndpointEngine, EndpointError, free_port


class Server:
    """A completions server on 127.0.0.1 answering from `replies` in turn: an int is that HTTP
    status, a str is sent as the body, a dict as JSON; `None` echoes a well-formed answer."""

    def __init__(self, replies=()):
        self.replies, self.bodies = list(replies), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.bodies.append(body)
                reply = outer.replies.pop(0) if outer.replies else None
                status, payload = 200, reply
                if isinstance(reply, int):
                    status, payload = reply, "overloaded"
                elif reply is None:  # continuation: the prompt's last token, then 1, 2, ...
                    choices = [
                        {"index": k, "token_ids": [body["prompt"][-1], *range(1, 1 + k)], "text": "x",
                         "finish_reason": "length"}
                        for k in reversed(range(body["n"]))
                    ]  # fmt: skip
                    payload = {"choices": choices}
                data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


SAMPLING = Sampling(max_new_tokens=5, temperature=0.6, top_p=0.95, n=3, seed=2)


def test_requests_carry_token_ids_and_every_setting(server):
    engine = EndpointEngine(server.url + "/v1/", "m", concurrency=2, extra={"top_k": 20})
    out = engine.sample([[5, 6], [7]], SAMPLING, seeds=[11, 12], stop=["\n\n"])
    assert out == [[[6], [6, 1], [6, 1, 2]], [[7], [7, 1], [7, 1, 2]]]  # in index order
    body = next(b for b in server.bodies if b["prompt"] == [5, 6])
    assert body["n"] == 3 and body["max_tokens"] == 5 and body["seed"] == 11 and body["top_k"] == 20
    assert body["temperature"] == 0.6 and body["top_p"] == 0.95 and body["stop"] == ["\n\n"]
    assert body["model"] == "m" and body["return_token_ids"] is True and "ignore_eos" not in body
    engine.sample([[1]], SAMPLING.replace(stop_at_eos=False))
    assert server.bodies[-1]["ignore_eos"] is True
    assert engine.describe() == {"engine": "endpoint", "model": "m", "extra": {"top_k": 20}}


def test_retries_overload_then_succeeds(server):
    server.replies = [503, 429]
    engine = EndpointEngine(server.url, "m", concurrency=1, retries=2, backoff=0.01)
    assert engine.sample([[3]], SAMPLING)[0][0] == [3]
    assert len(server.bodies) == 3


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (400, "refused the request: HTTP 400"),
        ("<html>oops</html>", "not JSON"),
        ({"choices": [{"index": 0, "token_ids": [1]}]}, "with 3 choices"),
        ({"choices": [{"index": k, "text": "a"} for k in range(3)]}, "no token ids"),
        ({"choices": [{"index": k, "token_ids": "12"} for k in range(3)]}, "list of ints"),
        ({"error": "bad"}, "completions response"),
    ],
)
def test_garbage_raises_at_once(server, reply, match):
    server.replies = [reply]
    engine = EndpointEngine(server.url, "m", retries=3, backoff=0.01)
    with pytest.raises(EndpointError, match=match):
        engine.sample([[3]], SAMPLING)
    assert len(server.bodies) == 1  # not retried


def test_a_server_that_is_down_fails_clearly_and_another_url_takes_over(server):
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(EndpointError, match="after 2 tries .* is the server running"):
        EndpointEngine(dead, "m", retries=1, backoff=0.01).sample([[3]], SAMPLING)
    both = EndpointEngine([dead, server.url], "m", concurrency=2, retries=1, backoff=0.01)
    out = both.sample([[k] for k in range(1, 9)], SAMPLING)
    assert [rows[0] for rows in out] == [[k] for k in range(1, 9)]
    assert both.prompts_per_call == 4


def test_text_answers_are_retokenised_with_the_tokenizer(server, llama):
    model, _ = llama
    ids = model.tokenizer.encode(" hello world", add_special_tokens=False)
    server.replies = [{"choices": [{"index": 0, "text": " hello world", "finish_reason": "length"}]}]
    engine = EndpointEngine(server.url, "m", tokenizer=model.tokenizer)
    assert engine.sample([[3]], SAMPLING.replace(n=1)) == [[ids]]


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="urls must be"):
        EndpointEngine("localhost:8000", "m")
    with pytest.raises(ValueError, match="model must be"):
        EndpointEngine("http://a", "")
    with pytest.raises(ValueError, match="concurrency must be an int >= 1"):
        EndpointEngine("http://a", "m", concurrency=0)
    with pytest.raises(TypeError, match="prompts must be a list"):
        EndpointEngine("http://a", "m").sample("text", SAMPLING)
