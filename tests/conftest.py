"""Shared fixtures and helpers: a tiny randomly initialised BERT (hidden 32, 2 layers) with a
hand-written vocabulary, hand-written review tasks, a checkpoint of the tiny model, the REST API
helpers (support sets, the JSON error shape, /metrics lines), servers on free ports, and ways to
wait on observable state (a gate that holds adaptations, polling with a deadline) instead of
sleeping. Test modules import helpers from here, never from each other."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI

from bench.server import free_port as free_port  # re-exported for the tests
from metasent.data.readers import Example
from metasent.data.registry import Task
from metasent.meta.checkpoint import save_checkpoint
from metasent.meta.config import CheckpointConfig, EncoderConfig, InnerLoopConfig
from metasent.meta.model import MetaLearner

ARSC_DIR = Path(os.environ.get("METASENT_ARSC_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "arsc"))

POSITIVE = [
    "great tasty coffee love it",
    "excellent fresh bread would buy again",
    "delicious sweet chocolate great value",
    "love this tea excellent flavour",
    "fresh tasty snack great price",
    "wonderful rich coffee delicious",
    "great product love the flavour",
    "excellent value tasty and fresh",
    "delicious cookies love them",
    "wonderful jam great taste",
]
NEGATIVE = [
    "awful stale bread never again",
    "terrible bitter coffee waste of money",
    "bad taste broken package awful",
    "stale cookies terrible value",
    "disgusting flavour bad product",
    "awful tea bitter and stale",
    "terrible snack broken and bad",
    "waste of money disgusting jam",
    "bad coffee never buy again",
    "bitter chocolate awful taste",
]
WORDS = sorted(
    {w for text in POSITIVE + NEGATIVE for w in text.split()} | {"okay", "fine", "average", "positive", "negative"}
)
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_tokenizer(directory: Path):
    from transformers import BertTokenizer

    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + WORDS) + "\n")
    tokenizer = BertTokenizer(vocab=str(vocab))  # transformers 5: ``vocab``, not ``vocab_file``
    assert tokenizer.convert_tokens_to_ids(["great", "coffee"]) != [tokenizer.unk_token_id] * 2
    return tokenizer


def make_tiny_model(directory: Path, seed: int = 0, max_length: int = 32) -> MetaLearner:
    """A randomly initialised BERT with hidden size 32 and 2 layers."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    tokenizer = make_tokenizer(directory)
    config = BertConfig(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = MetaLearner(BertModel(config), tokenizer, EncoderConfig(name_or_path="tiny-bert", max_length=max_length))
    return model.eval()


def save_tiny_encoder(directory: Path) -> Path:
    """Save a tiny BERT and its tokenizer as a Hugging Face folder (an encoder given by path)."""
    model = make_tiny_model(directory.parent)
    model.encoder.save_pretrained(str(directory))
    model.tokenizer.save_pretrained(str(directory))
    return directory


def write_arsc_like(root: Path) -> Path:
    """A tiny ARSC-shaped directory: domains food, drinks and snacks (one binary task each, the
    same 20 reviews rotated), each with train, dev and test files."""
    root.mkdir()
    for i, domain in enumerate(["food", "drinks", "snacks"]):
        pos, neg = POSITIVE[i:] + POSITIVE[:i], NEGATIVE[i:] + NEGATIVE[:i]
        lines = [f"{t}\t1" for t in pos] + [f"{t}\t-1" for t in neg]
        for split in ("train", "dev", "test"):
            (root / f"{domain}.t2.{split}").write_text("\n".join(lines) + "\n")
    return root


def make_task(name: str = "food", domain: str = "food") -> Task:
    pos = [Example(t, "positive") for t in POSITIVE]
    neg = [Example(t, "negative") for t in NEGATIVE]
    return Task(
        name=name,
        domain=domain,
        labels=("negative", "positive"),
        splits={"train": pos[:8] + neg[:8], "dev": pos[8:] + neg[8:], "test": pos[6:] + neg[6:]},
    )


@pytest.fixture
def tiny_model(tmp_path: Path) -> MetaLearner:
    return make_tiny_model(tmp_path)


@pytest.fixture
def food_task() -> Task:
    return make_task()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of the tiny model with a short inner loop (3 steps, top layer adapted)."""
    directory = tmp_path_factory.mktemp("tiny")
    model = make_tiny_model(directory)
    config = CheckpointConfig(
        algorithm="none",
        encoder=model.encoder_config,
        inner_loop=InnerLoopConfig(steps=3, lr=0.1, adapted_layers=1),
    )
    return save_checkpoint(directory / "checkpoint", model, config)


@pytest.fixture(scope="session")
def modified_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with a 2-step inner loop: same weights, another hash."""
    copy = Path(shutil.copytree(tiny_checkpoint, tmp_path_factory.mktemp("modified") / "checkpoint"))
    config = CheckpointConfig.model_validate_json((copy / "metasent.json").read_text())
    config.inner_loop.steps = 2
    (copy / "metasent.json").write_text(config.model_dump_json(indent=2))
    return copy


# -- databases: every store test runs on SQLite and on PostgreSQL --------------------------------

POSTGRES_URL = os.environ.get("METASENT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
DATABASES = ["sqlite", "postgresql"]


@contextmanager
def database(kind: str, directory: Path) -> Iterator[str]:
    """A fresh, empty database of ``kind`` (``sqlite``: a file in ``directory``; ``postgresql``: a new
    schema in :data:`POSTGRES_URL`'s database, first on the ``search_path`` of every connection,
    dropped on exit). Fails (never skips) when no PostgreSQL server answers."""
    if kind == "sqlite":
        yield f"sqlite:///{directory / 'metasent.db'}"
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    schema = f"t_{uuid.uuid4().hex[:16]}"
    admin = create_engine(POSTGRES_URL)
    try:
        with admin.begin() as connection:
            connection.execute(text(f"CREATE SCHEMA {schema}"))
    except OperationalError as error:
        admin.dispose()
        pytest.fail(
            f"no PostgreSQL server answers at {POSTGRES_URL} ({type(error).__name__}): start one "
            "(scripts/setup.sh installs Debian's postgresql) or set METASENT_TEST_POSTGRES_URL",
            pytrace=False,
        )
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as connection:
            connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a fresh database, once on SQLite and once on PostgreSQL."""
    with database(request.param, tmp_path) as url:
        yield url


# -- the REST API: support sets, the JSON error shape, /metrics ----------------------------------

TEXTS = [POSITIVE[8], NEGATIVE[8], POSITIVE[9], NEGATIVE[9], "okay fine average"]


def support(pos: str = "positive", neg: str = "negative", k: int = 5) -> list[dict[str, str]]:
    """A K-shot support set for the REST API: ``k`` positive then ``k`` negative reviews."""
    positives = [{"text": t, "label": pos} for t in POSITIVE[:k]]
    return positives + [{"text": t, "label": neg} for t in NEGATIVE[:k]]


def valid_domain() -> dict[str, Any]:
    return {"name": "food", "examples": support()}


def assert_error(response, status: int, field: str | None = None, code: str | None = None) -> dict:
    """The response is ``status`` in the JSON error shape, a detail names ``field`` with a fix."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"code", "message", "details"}
    assert error["code"] and error["message"] and error["details"]
    for detail in error["details"]:
        assert set(detail) == {"field", "message", "fix"}
        assert detail["fix"].strip() and detail["message"].strip()
    if field is not None:
        assert field in [d["field"] for d in error["details"]], error["details"]
    if code is not None:
        assert error["code"] == code
    return error


def assert_same_scores(a: list[dict[str, float]], b: list[dict[str, float]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert list(x) == list(y)
        assert x == pytest.approx(y, abs=1e-6 + 1e-12)  # scores have 6 decimals: 1e-6 apart, with float error


def metric(text: str, line_start: str, default: float | None = None) -> float:
    """The value of the one /metrics line that starts with ``line_start``."""
    lines = [line for line in text.splitlines() if line.startswith(line_start)]
    if not lines and default is not None:
        return default
    (line,) = lines
    return float(line.rsplit(" ", 1)[1])


def stored_domains(client: Any) -> float:
    """``metasent_domains`` (stored domains of every tenant) from the client's ``/metrics``:
    ``/healthz`` does not show it (it is open to anyone)."""
    return metric(client.get("/metrics").text, "metasent_domains")


# -- servers on free ports -----------------------------------------------------------------------


@contextmanager
def serve_in_thread(app: FastAPI, timeout: float = 60, settings: Any = None) -> Iterator[str]:
    """``app`` under uvicorn in a thread, on a socket bound to a free port before the server starts
    (no port to race for); yields its URL once it accepts connections. With ``settings`` (a
    :class:`metasent.app.settings.Settings`), uvicorn is configured as ``metasent serve`` does
    (:func:`metasent.app.server.uvicorn_config`: h11, header cap, connection limit)."""
    import uvicorn

    from metasent.app.server import uvicorn_config

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    if settings is not None:
        config = uvicorn_config(app, settings)
    else:
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            assert thread.is_alive(), "the server thread exited before it started"
            assert time.monotonic() < deadline, f"the server did not start in {timeout} s"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


FAULT_SERVER = Path(__file__).with_name("fault_server.py")
SERVER_KEY = "server-test-key"


class Server:
    """``metasent serve`` in a subprocess (through the test-only launcher tests/fault_server.py, so
    ``FAULT_*`` settings in ``env`` inject delays) on a free port, logging to ``log``.

    Args:
        checkpoint (`Path`): the served checkpoint (the tiny one starts in seconds).
        data_dir (`Path`): ``METASENT_DATA_DIR`` (the SQLite store, unless ``env`` sets
            ``METASENT_DATABASE_URL``).
        log (`Path`): file for the server's output.
        wait (`bool`, defaults to `True`): wait until ``/readyz`` answers 200 (else call
            :meth:`wait_ready`; several servers then start at once).
        **env (`str`): more settings, overriding the defaults (one API key, CPU, one thread).
    """

    def __init__(self, checkpoint: Path, data_dir: Path, log: Path, wait: bool = True, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [
            sys.executable,
            str(FAULT_SERVER),
            "serve",
            "--port",
            str(self.port),
            "--checkpoint",
            str(checkpoint),
        ]
        environment = {
            **os.environ,
            "METASENT_DATA_DIR": str(data_dir),
            "METASENT_API_KEYS": SERVER_KEY,
            "METASENT_DEVICE": "cpu",
            "METASENT_THREADS": "1",
            "METASENT_BATCH_WINDOW_MS": "0",
            **env,
        }
        self._log_file = log.open("w")
        self.process = subprocess.Popen(
            command, env=environment, cwd=data_dir.parent, stdout=self._log_file, stderr=subprocess.STDOUT
        )
        self.client = self.session(SERVER_KEY)
        self._background: list[threading.Thread] = []
        self.answered: list[str] = []  # background requests answered although the kill should come first
        if wait:
            self.wait_ready()

    def session(self, key: str) -> httpx.Client:
        """A client of this server with API key ``key`` (one tenant)."""
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    def wait_ready(self, timeout: float = 90) -> None:
        """Poll ``/readyz`` until it answers 200; fail with the server's log when the process exits
        or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"not ready after {timeout} s:\n{self.log.read_text()}"
            time.sleep(0.1)

    def wait_for_log(self, text: str, count: int = 1, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.log.read_text().count(text) < count:
            assert time.monotonic() < deadline, f"{text!r} not logged:\n{self.log.read_text()}"
            time.sleep(0.05)

    def wait_for_queue_depth(self, depth: int, timeout: float = 30) -> None:
        """Until ``depth`` adaptations wait or run (the adaptation queue's gauge on /metrics)."""
        deadline = time.monotonic() + timeout
        line = f"metasent_adaptation_queue_depth {float(depth)}"
        while line not in self.client.get("/metrics", timeout=5).text:  # with the key: /metrics needs one
            assert time.monotonic() < deadline, f"queue depth never reached {depth}"
            time.sleep(0.05)

    def in_background(
        self, method: str, path: str, body: dict[str, Any], client: httpx.Client | None = None
    ) -> threading.Thread:
        """Send a request that is expected never to be answered (the server gets killed)."""
        sender = client or self.client

        def send() -> None:
            try:
                response = sender.request(method, path, json=body)
            except httpx.TransportError:  # the connection died with the server
                return
            self.answered.append(f"{method} {path} -> {response.status_code} {response.text}")

        thread = threading.Thread(target=send, daemon=True)
        thread.start()
        self._background.append(thread)
        return thread

    def kill(self) -> None:
        """SIGKILL: no shutdown handler, no flush, no commit runs."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        for thread in self._background:
            thread.join(timeout=30)
            assert not thread.is_alive(), "a background request outlived the server"
        self.client.close()
        self._log_file.close()
        assert self.process.returncode == -signal.SIGKILL
        assert not self.answered, f"answered before the kill: {self.answered}"


@contextmanager
def server(checkpoint: Path, data_dir: Path, log: Path, **env: str) -> Iterator[Server]:
    """A :class:`Server`, ready, killed on exit."""
    started = Server(checkpoint, data_dir, log, **env)
    try:
        yield started
    finally:
        if started.process.poll() is None:
            started.kill()


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan run, behind an async client (concurrent requests)."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


# -- waiting on observable state, never on a sleep -----------------------------------------------


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Poll ``condition`` on the event loop until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.005)


class AdaptationGate:
    """Holds every adaptation of an app in its worker thread until :meth:`release`, so what a test
    observes while an adaptation runs (queue depth, 429s, a timeout) cannot race with it finishing.

    ``entered`` counts adaptations that reached the gate, ``finished`` those that passed it and
    returned (or raised).
    """

    def __init__(self, timeout: float = 60) -> None:
        self._open = threading.Event()
        self._lock = threading.Lock()
        self._timeout = timeout
        self.entered = 0
        self.finished = 0

    def release(self) -> None:
        """Let every held and later adaptation run."""
        self._open.set()

    def wrap(self, adapt: Callable[..., Any]) -> Callable[..., Any]:
        def gated(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.entered += 1
            try:
                if not self._open.wait(self._timeout):
                    raise TimeoutError("the test never released the adaptation gate")
                return adapt(*args, **kwargs)
            finally:
                with self._lock:
                    self.finished += 1

        return gated


@contextmanager
def gated_adaptations(app: FastAPI) -> Iterator[AdaptationGate]:
    """Every adaptation of the running ``app`` (``ModelService.adapt``: create, PUT examples,
    stateless classify, a stale domain's re-adaptation) waits at a gate the test releases; the gate
    opens and the service is restored on exit."""
    service = app.state.service
    original = service.adapt
    gate = AdaptationGate()
    service.adapt = gate.wrap(original)
    try:
        yield gate
    finally:
        gate.release()
        service.adapt = original


@contextmanager
def request_timeout(app: FastAPI, seconds: float) -> Iterator[None]:
    """The app's request time limit (``TimeoutMiddleware``, from METASENT_REQUEST_TIMEOUT_S) set to
    ``seconds`` inside the block: a test that makes one held request time out gives the requests
    around it a limit they cannot hit on a busy machine."""
    from metasent.app.limits import TimeoutMiddleware

    if app.middleware_stack is None:  # built on the first request; build it as Starlette would
        app.middleware_stack = app.build_middleware_stack()
    layer: Any = app.middleware_stack
    while not isinstance(layer, TimeoutMiddleware):
        layer = layer.app
    previous, layer.seconds = layer.seconds, seconds
    try:
        yield
    finally:
        layer.seconds = previous


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Nothing may skip: a skipped test fails the run (scripts/setup.sh installs everything the
    tests need: chromium, nginx, PostgreSQL)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped and session.exitstatus == 0:
        for report in skipped:
            print(f"\nskipped, which fails the run: {report.nodeid}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
