"""A small Python client of the metasent REST API (httpx).

    from .client import MetasentClient

    with MetasentClient("http://127.0.0.1:8000") as client:
        domain = client.create_domain("food", [{"text": "tasty", "label": "positive"}, ...])
        result = client.classify(domain["domain_id"], ["lovely jam"])

Every error answer becomes a :class:`MetasentError` with the server's status, code, field and fix.
Answers 429 (adaptation queue full) and 503 (timeout, store down, too many connections) are
retried with backoff that honours ``Retry-After`` (tenacity), up to ``max_attempts`` in all;
``create_domain`` and ``update_examples`` send one ``Idempotency-Key`` per call, the same on each
of its retries, so a server that honours it never applies a retried write twice.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx
from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

logger = logging.getLogger(__name__)

API_KEY_ENV = "METASENT_API_KEY"
IDEMPOTENCY_HEADER = "Idempotency-Key"
RETRY_STATUSES = frozenset({429, 503})  # the server's "try again later" answers


class MetasentError(Exception):
    """An error answer of the server (or no answer at all).

    Args:
        status (`int | None`): HTTP status; None when the server could not be reached.
        code (`str`): the server's error code, e.g. ``"domain_not_found"``.
        message (`str`): what went wrong.
        field (`str | None`): the part of the request at fault (the first detail's).
        fix (`str | None`): what to change (the first detail's).
        details (`list[dict]`): every ``{field, message, fix}`` detail.
        retry_after (`float | None`): the ``Retry-After`` header (429, 503), seconds.
        attempts (`int`, defaults to 1): requests sent before giving up (more than 1 after retries).
    """

    def __init__(
        self,
        status: int | None,
        code: str,
        message: str,
        field: str | None = None,
        fix: str | None = None,
        details: list[dict[str, str]] | None = None,
        retry_after: float | None = None,
        attempts: int = 1,
    ) -> None:
        gave_up = f" (gave up after {attempts} attempts)" if attempts > 1 else ""
        super().__init__(f"{status or 'no response'} {code}: {message}" + (f" (fix: {fix})" if fix else "") + gave_up)
        self.status, self.code, self.message, self.field, self.fix = status, code, message, field, fix
        self.details = details or []
        self.retry_after = retry_after
        self.attempts = attempts

    @property
    def retryable(self) -> bool:
        """Whether the server asked to try again later (429 or 503)."""
        return self.status in RETRY_STATUSES

    def after_attempts(self, attempts: int) -> MetasentError:
        """This error, saying that ``attempts`` requests were sent before giving up."""
        return MetasentError(
            self.status, self.code, self.message, self.field, self.fix, self.details, self.retry_after, attempts
        )

    @classmethod
    def from_response(cls, response: httpx.Response) -> MetasentError:
        """The error of a non-2xx response; a body not in the JSON error shape keeps its text."""
        retry = response.headers.get("Retry-After")
        retry_after = float(retry) if retry and retry.replace(".", "", 1).isdigit() else None
        try:
            error = response.json()["error"]
            details = list(error.get("details") or [])
            first = details[0] if details else {}
            return cls(
                response.status_code,
                str(error["code"]),
                str(error["message"]),
                first.get("field"),
                first.get("fix"),
                details,
                retry_after,
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            text = response.text.strip()[:500] or response.reason_phrase
            return cls(response.status_code, f"http_{response.status_code}", text, retry_after=retry_after)


class RetryAfterWait:
    """tenacity's wait: the server's ``Retry-After`` when it sent one, else exponential backoff with
    jitter; never more than ``max_wait_s``.

    Args:
        max_wait_s (`float`): the longest wait, seconds.
        initial_s (`float`, defaults to 0.5): the first backoff without ``Retry-After``, seconds.
    """

    def __init__(self, max_wait_s: float, initial_s: float = 0.5) -> None:
        self.max_wait_s = max_wait_s
        self._backoff = wait_exponential(multiplier=initial_s, max=max_wait_s) + wait_random(0, initial_s)

    def __call__(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome is not None else None
        retry_after = error.retry_after if isinstance(error, MetasentError) else None
        seconds = retry_after if retry_after is not None else self._backoff(state)
        return max(0.0, min(seconds, self.max_wait_s))


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome is not None else None
    wait = state.next_action.sleep if state.next_action is not None else 0.0
    logger.warning("attempt %d answered %s; retrying in %.1f s", state.attempt_number, error, wait)


class MetasentClient:
    """Client of a metasent server.

    Args:
        base_url (`str`): e.g. ``http://127.0.0.1:8000``.
        api_key (`str`, *optional*): sent as ``Authorization: Bearer``; defaults to the
            ``METASENT_API_KEY`` environment variable.
        timeout (`float`, defaults to 120): seconds per request (adaptation can take a while).
        http_client (`httpx.Client`, *optional*): a client to send through instead (e.g. a
            ``fastapi.testclient.TestClient``); ``base_url`` and ``timeout`` are then its own.
        max_attempts (`int`, defaults to 4): requests per call in all; a 429 or 503 answer is retried
            until then, other errors never. 1 turns retries off.
        max_wait_s (`float`, defaults to 60): the longest wait between two attempts, seconds (a
            longer ``Retry-After`` is cut to it).
        sleep (`Callable[[float], None]`, defaults to `time.sleep`): how to wait between attempts.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = 120.0,
        http_client: httpx.Client | None = None,
        max_attempts: int = 4,
        max_wait_s: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._owned = http_client is None
        self._http = http_client or httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout)
        self.max_attempts = max_attempts
        self._wait = RetryAfterWait(max_wait_s)
        self._sleep = sleep

    def __enter__(self) -> MetasentClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owned:
            self._http.close()

    def _request(self, method: str, path: str, body: Any = None, idempotency_key: str | None = None) -> Any:
        """Send one call, retrying 429 and 503 answers (every attempt with the same headers).

        Raises:
            MetasentError: the error answer; after ``max_attempts`` 429/503 answers, the last one.
        """
        headers = dict(self._headers)
        if idempotency_key is not None:
            headers[IDEMPOTENCY_HEADER] = idempotency_key
        retrying = Retrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=self._wait,
            retry=retry_if_exception(lambda error: isinstance(error, MetasentError) and error.retryable),
            sleep=self._sleep,
            before_sleep=_log_retry,
        )
        try:
            return retrying(self._send, method, path, body, headers)
        except RetryError as gave_up:
            last = gave_up.last_attempt.exception()
            assert isinstance(last, MetasentError)
            raise last.after_attempts(gave_up.last_attempt.attempt_number) from None

    def _send(self, method: str, path: str, body: Any, headers: dict[str, str]) -> Any:
        try:
            response = self._http.request(method, path, json=body, headers=headers)
        except httpx.HTTPError as error:
            raise MetasentError(None, "connection_error", f"{method} {path}: {error}") from error
        if response.status_code >= 400:
            raise MetasentError.from_response(response)
        return response.json() if response.content else None

    def create_domain(
        self, name: str, examples: Iterable[Mapping[str, str]], idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Adapt a new domain on ``examples`` (``{"text", "label"}`` each); returns the domain.

        Args:
            name (`str`): the domain's name.
            examples (`Iterable[Mapping[str, str]]`): the support set.
            idempotency_key (`str`, *optional*): sent as ``Idempotency-Key`` on every attempt
                (default: a new uuid4 per call); pass your own to repeat a call safely later.

        Raises:
            MetasentError: e.g. 422 ``invalid_request``, 413, 429 ``adaptation_queue_full`` (after
                the retries).
        """
        body = {"name": name, "examples": [dict(e) for e in examples]}
        return self._request("POST", "/v1/domains", body, idempotency_key or str(uuid.uuid4()))

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: the server's status and model (``checkpoint_hash`` names the weights)."""
        return self._request("GET", "/healthz")

    def ready(self) -> dict[str, Any]:
        """``GET /readyz``: ``{"status", "model_loaded", "store_reachable"}``, answered once, not
        retried: a server that is not ready (503) returns its body too (``status: not_ready``).

        Raises:
            MetasentError: the server cannot be reached, or answers anything but 200/503 with a body.
        """
        try:
            response = self._http.request("GET", "/readyz", headers=self._headers)
        except httpx.HTTPError as error:
            raise MetasentError(None, "connection_error", f"GET /readyz: {error}") from error
        if response.status_code not in (200, 503):
            raise MetasentError.from_response(response)
        try:
            return dict(response.json())
        except (ValueError, TypeError):
            raise MetasentError.from_response(response) from None

    def metrics(self) -> str:
        """``GET /metrics``: the Prometheus text exposition (needs the API key unless the server's
        ``METASENT_OPS_ACCESS`` is ``open``; absent when it serves them on ``METASENT_METRICS_PORT``).

        Raises:
            MetasentError: e.g. 401, 404.
        """
        try:
            response = self._http.request("GET", "/metrics", headers=self._headers)
        except httpx.HTTPError as error:
            raise MetasentError(None, "connection_error", f"GET /metrics: {error}") from error
        if response.status_code >= 400:
            raise MetasentError.from_response(response)
        return response.text

    def list_domains(self) -> list[dict[str, Any]]:
        """Every domain's metadata."""
        return self._request("GET", "/v1/domains")["domains"]

    def get_domain(self, domain_id: str) -> dict[str, Any]:
        """One domain's metadata.

        Raises:
            MetasentError: 404 ``domain_not_found``.
        """
        return self._request("GET", f"/v1/domains/{domain_id}")

    def get_examples(self, domain_id: str) -> dict[str, Any]:
        """A domain's stored support set: ``{"domain_id", "version", "examples"}``.

        Raises:
            MetasentError: 404 ``domain_not_found``.
        """
        return self._request("GET", f"/v1/domains/{domain_id}/examples")

    def delete_domain(self, domain_id: str) -> None:
        """Forget a domain.

        Raises:
            MetasentError: 404 ``domain_not_found``.
        """
        self._request("DELETE", f"/v1/domains/{domain_id}")

    def classify(self, domain_id: str, texts: Iterable[str]) -> dict[str, Any]:
        """Classify ``texts`` with a domain; returns ``{"domain_id", "predictions"}``.

        Raises:
            MetasentError: 404 ``domain_not_found``, 422, 413.
        """
        return self._request("POST", f"/v1/domains/{domain_id}/classify", {"texts": list(texts)})

    def suggest(self, domain_id: str, texts: Iterable[str], k: int = 5) -> dict[str, Any]:
        """``POST /v1/domains/{id}/suggest``: the ``k`` texts among ``texts`` worth labelling next
        (BADGE); returns ``{"domain_id", "method", "suggestions"}``, each suggestion with its
        ``index`` in ``texts``, ``text``, predicted ``label``, ``scores`` and ``uncertainty``.

        Raises:
            MetasentError: e.g. 404 ``domain_not_found``, 422, 413, 429.
        """
        return self._request("POST", f"/v1/domains/{domain_id}/suggest", {"texts": list(texts), "k": k})

    def update_examples(
        self,
        domain_id: str,
        examples: Iterable[Mapping[str, str]],
        mode: str = "add",
        expected_version: int | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """``PUT /v1/domains/{id}/examples``: add to (``mode="add"``) or replace the support set and
        re-adapt; ``expected_version`` guards against concurrent updates. ``idempotency_key`` is
        sent as ``Idempotency-Key`` on every attempt (default: a new uuid4 per call).

        Raises:
            MetasentError: e.g. 404, 409 on a version mismatch, 429 when the queue is full (after
                the retries).
        """
        body: dict[str, Any] = {"examples": [dict(e) for e in examples], "mode": mode}
        if expected_version is not None:
            body["expected_version"] = expected_version
        key = idempotency_key or str(uuid.uuid4())
        return self._request("PUT", f"/v1/domains/{domain_id}/examples", body, key)

    def classify_stateless(self, examples: Iterable[Mapping[str, str]], texts: Iterable[str]) -> dict[str, Any]:
        """``POST /v1/classify``: adapt on ``examples`` and classify ``texts`` without keeping a domain.

        Raises:
            MetasentError: e.g. 422, 413, 429.
        """
        return self._request("POST", "/v1/classify", {"examples": [dict(e) for e in examples], "texts": list(texts)})


def read_examples(path: Path) -> list[dict[str, str]]:
    """Labelled examples from a JSONL file (one ``{"text", "label"}`` object a line) or a CSV file
    with ``text`` and ``label`` columns.

    Raises:
        ValueError: a line or row without ``text`` and ``label`` (names the line).
    """
    examples: list[dict[str, str]] = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as file:
            rows: Iterable[tuple[int, Any]] = list(enumerate(csv.DictReader(file), start=2))
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
        rows = [(n, _json_line(line, path, n)) for n, line in enumerate(lines, start=1) if line.strip()]
    for number, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not isinstance(row.get("label"), str):
            raise ValueError(f"{path}:{number}: needs a text and a label")
        examples.append({"text": row["text"], "label": row["label"]})
    return examples


def _json_line(line: str, path: Path, number: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from error


def read_texts(path: Path) -> list[str]:
    """Texts from a file: JSONL objects with a ``text`` field, or else one text per line."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = []
    for line in lines:
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            value = line
        texts.append(value["text"] if isinstance(value, dict) and "text" in value else line)
    return texts


__all__ = ["MetasentClient", "MetasentError", "read_examples", "read_texts"]
