"""A small Python client of the metasent REST API (httpx).

    from .client import MetasentClient

    with MetasentClient("http://127.0.0.1:8000") as client:
        domain = client.create_domain("food", [{"text": "tasty", "label": "positive"}, ...])
        result = client.classify(domain["domain_id"], ["lovely jam"])

Every error answer becomes a :class:`MetasentError` with the server's status, code, field and fix.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx

API_KEY_ENV = "METASENT_API_KEY"


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
    ) -> None:
        super().__init__(f"{status or 'no response'} {code}: {message}" + (f" (fix: {fix})" if fix else ""))
        self.status, self.code, self.message, self.field, self.fix = status, code, message, field, fix
        self.details = details or []
        self.retry_after = retry_after

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


class MetasentClient:
    """Client of a metasent server.

    Args:
        base_url (`str`): e.g. ``http://127.0.0.1:8000``.
        api_key (`str`, *optional*): sent as ``Authorization: Bearer``; defaults to the
            ``METASENT_API_KEY`` environment variable.
        timeout (`float`, defaults to 120): seconds per request (adaptation can take a while).
        http_client (`httpx.Client`, *optional*): a client to send through instead (e.g. a
            ``fastapi.testclient.TestClient``); ``base_url`` and ``timeout`` are then its own.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = 120.0,
        http_client: httpx.Client | None = None,
    ) -> None:
        api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._owned = http_client is None
        self._http = http_client or httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout)

    def __enter__(self) -> MetasentClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owned:
            self._http.close()

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        try:
            response = self._http.request(method, path, json=body, headers=self._headers)
        except httpx.HTTPError as error:
            raise MetasentError(None, "connection_error", f"{method} {path}: {error}") from error
        if response.status_code >= 400:
            raise MetasentError.from_response(response)
        return response.json() if response.content else None

    def create_domain(self, name: str, examples: Iterable[Mapping[str, str]]) -> dict[str, Any]:
        """Adapt a new domain on ``examples`` (``{"text", "label"}`` each); returns the domain.

        Raises:
            MetasentError: e.g. 422 ``invalid_request``, 413, 429 ``adaptation_queue_full``.
        """
        return self._request("POST", "/v1/domains", {"name": name, "examples": [dict(e) for e in examples]})

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

    def update_examples(
        self,
        domain_id: str,
        examples: Iterable[Mapping[str, str]],
        mode: str = "add",
        expected_version: int | None = None,
    ) -> dict[str, Any]:
        """``PUT /v1/domains/{id}/examples``: add to (``mode="add"``) or replace the support set and
        re-adapt; ``expected_version`` guards against concurrent updates.

        Raises:
            MetasentError: e.g. 404, 409 on a version mismatch, 429 when the queue is full.
        """
        body: dict[str, Any] = {"examples": [dict(e) for e in examples], "mode": mode}
        if expected_version is not None:
            body["expected_version"] = expected_version
        return self._request("PUT", f"/v1/domains/{domain_id}/examples", body)

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
