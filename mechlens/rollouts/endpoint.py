"""`EndpointEngine`: sampling over OpenAI-compatible `/v1/completions` servers (vLLM, SGLang,
hosted providers), one or many.

Each prompt is one request (`prompt` as token ids, `n`, `seed`, temperature, top-p,
`max_tokens`, `stop`); requests run concurrently, `concurrency` at a time per base URL, taken
from one queue so a fast server takes more of them. A request that fails on a connection error,
a timeout, HTTP 429 or a 5xx answer is retried with exponential backoff (on the next URL when
there are several); any other HTTP error, or an answer that is not a completions response with
`n` choices, raises at once with the server's words. Continuations come back as token ids when
the server returns them (vLLM: `return_token_ids`); otherwise, given a `tokenizer`, the text is
re-tokenised (exact only where the tokenizer round-trips; said in `describe()`).

`timeout` bounds each whole request, the reading of a slowly trickled answer included. Redirects
are never followed (an `Authorization` header must not travel to another host): a 3xx answer
raises, naming where it pointed.

Example (with a server running, see the README's "Sampling at scale"):
    >>> from mechlens.rollouts import EndpointEngine
    >>> engine = EndpointEngine("http://127.0.0.1:8000", model="smollm2")  # doctest: +SKIP
    >>> engine.sample([[1, 2, 3]], ml.Sampling(max_new_tokens=8, n=4))     # doctest: +SKIP
"""

from __future__ import annotations

import http.client
import json
import math
import queue
import threading
import time
import urllib.parse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

from tqdm.auto import tqdm

from mechlens.models.loading import DtypeName
from mechlens.models.sampling import Sampling
from mechlens.rollouts.engines import LocalEngine, check_request, cut_at_stop
from mechlens.rollouts.shared_prefix import MODEL_TYPES as SHARED_PREFIX_TYPES
from mechlens.rollouts.shared_prefix import SharedPrefixEngine

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class EndpointError(RuntimeError):
    """A completions endpoint that could not be reached, or answered something unusable."""


class EndpointEngine:
    """Samples through one or more OpenAI-compatible completions endpoints.

    Args:
        urls: a base URL (`http://host:port` or `.../v1`) or a list of them (one per replica, or
            one load-balanced URL).
        model: the served model name.
        tokenizer: the model's tokenizer; needed only when a server returns text without token
            ids, and to drop end-of-sequence tokens.
        api_key: sent as a bearer token (hosted providers).
        concurrency: requests in flight per URL.
        retries: tries per request beyond the first, on retryable failures.
        backoff: seconds before the first retry, doubling each time (capped at 60).
        timeout: seconds per request, from connecting to the last byte of the answer.
        extra: more request fields, sent as they are (e.g. `{"top_k": 20}`).
        progress: a bar over prompts.
    """

    name = "endpoint"

    def __init__(
        self,
        urls: str | Sequence[str],
        model: str,
        tokenizer: Any = None,
        api_key: str | None = None,
        concurrency: int = 8,
        retries: int = 5,
        backoff: float = 1.0,
        timeout: float = 600.0,
        extra: dict[str, Any] | None = None,
        progress: bool = False,
    ):
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls or not all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in urls):
            raise ValueError(f"urls must be one or more http(s):// base URLs, got {urls!r}")
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be the served model's name, got {model!r}")
        for arg, value, least in (("concurrency", concurrency, 1), ("retries", retries, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{arg} must be an int >= {least}, got {value!r}")
        for arg, seconds in (("backoff", backoff), ("timeout", timeout)):
            if (
                isinstance(seconds, bool)
                or not isinstance(seconds, int | float)
                or not math.isfinite(seconds)
            ):
                raise ValueError(f"{arg} must be a finite number of seconds, got {seconds!r}")
        if backoff < 0 or timeout <= 0:
            raise ValueError(f"backoff must be >= 0 and timeout > 0, got {backoff!r} and {timeout!r}")
        self.urls = [_completions_url(u) for u in urls]
        self.model, self.tokenizer, self.api_key = model, tokenizer, api_key
        self.concurrency, self.retries, self.backoff, self.timeout = concurrency, retries, backoff, timeout
        self.extra, self.progress = dict(extra or {}), progress
        self.prompts_per_call = concurrency * len(self.urls)

    def describe(self) -> dict[str, Any]:
        """Engine, served model and extra fields (not the URLs: where a model is served does not
        change what it samples)."""
        return {"engine": self.name, "model": self.model, "extra": self.extra}

    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: Sampling,
        seeds: Sequence[int] | None = None,
        stop: Sequence[str] = (),
    ) -> list[list[list[int]]]:
        vocab = len(self.tokenizer) if self.tokenizer is not None else None
        ids, seeds, stop = check_request(prompts, sampling, seeds, stop, vocab)
        bodies = [self._body(p, sampling, s, stop) for p, s in zip(ids, seeds, strict=True)]
        results: list[list[list[int]] | None] = [None] * len(ids)
        errors: list[BaseException] = []
        jobs: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(len(ids)):
            jobs.put(i)
        bar = tqdm(total=len(ids), desc="endpoint", disable=not self.progress)
        lock = threading.Lock()

        def worker(first_url: int) -> None:
            while not errors:
                try:
                    i = jobs.get_nowait()
                except queue.Empty:
                    return
                try:
                    answer = self._request(bodies[i], first_url)
                    results[i] = self._continuations(answer, sampling.n, stop)
                except BaseException as err:  # handed to the caller below
                    with lock:
                        errors.append(err)
                    return
                with lock:
                    bar.update()

        threads = [
            threading.Thread(target=worker, args=(u,), daemon=True)
            for u in range(len(self.urls))
            for _ in range(self.concurrency)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        bar.close()
        if errors:
            raise errors[0]
        return cast(list[list[list[int]]], results)  # every prompt answered, or raised above

    def _body(self, prompt: list[int], sampling: Sampling, seed: int, stop: tuple[str, ...]) -> dict:
        body = {
            "model": self.model,
            "prompt": prompt,
            "n": sampling.n,
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "seed": seed,
            "return_token_ids": True,
            "skip_special_tokens": False,
        }
        if stop:
            body["stop"] = list(stop)
        if not sampling.stop_at_eos:
            body["ignore_eos"] = True
        return {**body, **self.extra}

    def _request(self, body: dict, first_url: int) -> dict:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            url = self.urls[(first_url + attempt) % len(self.urls)]
            try:
                status, location, text = _post(url, data, headers, self.timeout)
            except (OSError, http.client.HTTPException) as err:  # refused, reset, timed out
                last = f"{type(err).__name__}: {err}"
            else:
                if 300 <= status < 400:
                    raise EndpointError(
                        f"{url} redirected (HTTP {status}) to {location!r}: redirects are not followed "
                        "(the request's credentials would travel with it); give the final URL"
                    )
                if status >= 400:
                    if status not in RETRY_STATUS:
                        raise EndpointError(f"{url} refused the request: HTTP {status}: {text[:500]}")
                    last = f"HTTP {status}: {text[:500]}"
                else:
                    try:
                        return json.loads(text)
                    except (json.JSONDecodeError, RecursionError):
                        raise EndpointError(
                            f"{url} answered something that is not JSON: {text[:200]!r}"
                        ) from None
            if attempt < self.retries:
                time.sleep(min(self.backoff * 2**attempt, 60.0))
        raise EndpointError(
            f"no answer from {', '.join(self.urls)} after {self.retries + 1} tries (last: {last}); "
            "is the server running and serving this model?"
        )

    def _continuations(self, answer: dict, n: int, stop: tuple[str, ...]) -> list[list[int]]:
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or len(choices) != n:
            raise EndpointError(
                f"expected a completions response with {n} choices, got {json.dumps(answer)[:300]}"
            )
        indices = [c.get("index", i) if isinstance(c, dict) else None for i, c in enumerate(choices)]
        valid = [i for i in indices if isinstance(i, int) and not isinstance(i, bool)]
        if sorted(valid) != list(range(n)) or len(valid) != n:
            raise EndpointError(f"the choices' indices must be 0..{n - 1}, got {indices}")
        by_index = dict(zip(valid, choices, strict=True))
        return [self._token_ids(by_index[i], stop) for i in range(n)]

    def _token_ids(self, choice: Any, stop: tuple[str, ...]) -> list[int]:
        if not isinstance(choice, dict):
            raise EndpointError(f"a choice of the response is not an object: {choice!r}")
        ids = choice.get("token_ids")
        if ids is None:
            if self.tokenizer is None or not isinstance(choice.get("text"), str):
                raise EndpointError(
                    "the server returned no token ids (`token_ids`); pass tokenizer= to re-tokenise "
                    f"its text, got {json.dumps(choice)[:200]}"
                )
            ids = self.tokenizer.encode(choice["text"], add_special_tokens=False)
        vocab = len(self.tokenizer) if self.tokenizer is not None else None
        if not isinstance(ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 and (vocab is None or t < vocab)
            for t in ids
        ):
            raise EndpointError(
                f"token_ids must be a list of ints (token ids in the vocabulary), got {str(ids)[:200]}"
            )
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if ids and eos is not None and ids[-1] == eos and choice.get("finish_reason") == "stop":
            ids = ids[:-1]
        if stop and self.tokenizer is not None:
            ids = cut_at_stop(ids, self.tokenizer.decode, stop)
        return ids


def _post(url: str, data: bytes, headers: dict[str, str], timeout: float) -> tuple[int, str, str]:
    """POST `data` to `url` within `timeout` seconds in all: `(status, Location header, body)`.

    No redirect is followed. Each socket wait is bounded by the time left, so a server that
    trickles its answer cannot hold the request past the deadline (`TimeoutError`)."""
    deadline = time.monotonic() + timeout

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no complete answer within timeout={timeout} s")
        return remaining

    parts = urllib.parse.urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = kind(parts.hostname or "", parts.port, timeout=left())
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request("POST", path or "/", body=data, headers=headers)
        response = conn.getresponse()
        chunks: list[bytes] = []
        while True:
            if conn.sock is not None:
                conn.sock.settimeout(left())
            chunk = response.read1(65536)
            if not chunk:
                if response.length:  # closed before the promised Content-Length: retried
                    raise http.client.IncompleteRead(b"".join(chunks), response.length)
                break
            chunks.append(chunk)
            left()
        body = b"".join(chunks).decode("utf-8", "replace")
        return response.status, response.getheader("Location", ""), body
    except TimeoutError as err:
        raise TimeoutError(f"no complete answer within timeout={timeout} s") from err
    finally:
        conn.close()


def _completions_url(base: str) -> str:
    base = base.rstrip("/")
    if base.endswith("/completions"):
        return base
    return base + ("/completions" if base.endswith("/v1") else "/v1/completions")


LocalKind = Literal["local", "shared-prefix", "auto"]
LOCAL_KINDS = ("local", "shared-prefix", "auto")
"""The in-process engines `engine_for` picks from (`local=`)."""


def engine_for(
    model: HookedModel | None,
    endpoint: str = "",
    served_model: str = "",
    batch_size: int = 16,
    concurrency: int = 8,
    local: LocalKind = "local",
    dtype: DtypeName = "auto",
):
    """The engine an experiment samples with. With an `endpoint` (comma-separated base URLs
    serving `served_model`, the same weights as `model`, whose tokenizer reads the answers): an
    `EndpointEngine`. Without one, by `local`: "local" is `LocalEngine(model, batch_size)` (the
    model's own `generate`, hooks and interventions included, in the model's dtype);
    "shared-prefix" is `SharedPrefixEngine(model, dtype)` (Llama-style decoders, no
    interventions; bf16 where the CPU is fast at it with `dtype="auto"`); "auto" is the
    shared-prefix engine for a model on the CPU whose architecture it writes out, else
    `LocalEngine` (a model on a GPU samples with its own `generate`).

    >>> import mechlens as ml
    >>> engine_for(ml.load_model("tiny-llama")).name
    'mechlens'
    >>> engine_for(ml.load_model("tiny-llama"), local="auto").name
    'shared-prefix'
    >>> engine_for(ml.load_model("tiny-gpt2"), local="auto").name
    'mechlens'
    >>> engine_for(None, "http://a:8000,http://b:8000", "r1").urls
    ['http://a:8000/v1/completions', 'http://b:8000/v1/completions']
    """
    if local not in LOCAL_KINDS:
        raise ValueError(f"local must be one of {LOCAL_KINDS}, got {local!r}")
    if not endpoint:
        if model is None:
            raise ValueError("model is needed to sample in-process (no endpoint given)")
        kind = getattr(model.plain_model.config, "model_type", None)
        on_cpu = model.device.type == "cpu"  # the shared-prefix engine is written for the CPU
        if local == "shared-prefix" or (local == "auto" and kind in SHARED_PREFIX_TYPES and on_cpu):
            return SharedPrefixEngine(model, dtype)
        return LocalEngine(model, batch_size)
    if not served_model:
        raise ValueError("served_model must name the model the endpoint serves when endpoint is given")
    urls = [u.strip() for u in endpoint.split(",") if u.strip()]
    return EndpointEngine(
        urls, served_model, tokenizer=getattr(model, "tokenizer", None), concurrency=concurrency
    )
