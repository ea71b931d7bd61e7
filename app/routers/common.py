"""What every ``/v1`` router shares: the documented error responses, the request-size check and
the conversion of request examples into a support set."""

from __future__ import annotations

from ..adaptation import Examples
from ..errors import ApiError
from ..schemas import ErrorResponse, LabelledText

V1_ERRORS: dict[int | str, dict[str, object]] = {  # every /v1 route: API key, request timeout
    401: {"model": ErrorResponse, "description": "Missing or unknown API key"},
    503: {
        "model": ErrorResponse,
        "description": "The request took longer than the server's timeout, or the characters of text being "
        "classified are at the server's limit (Retry-After)",
    },
}
REQUEST_ERRORS: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorResponse, "description": "Malformed JSON"},
    413: {
        "model": ErrorResponse,
        "description": "More examples, texts or characters, or a larger body, than the server's limits",
    },
    422: {"model": ErrorResponse, "description": "Invalid field, e.g. a support text too long (names it and the fix)"},
}
QUEUE_FULL: dict[int | str, dict[str, object]] = {
    429: {"model": ErrorResponse, "description": "The adaptation queue is full (Retry-After)"}
}


def check_limit(count: int, limit: int, field: str, setting: str) -> None:
    """Raises a 413 :class:`ApiError` naming ``field`` when ``count`` exceeds ``limit``."""
    if count > limit:
        raise ApiError(
            413,
            "too_many_items",
            f"{count} {field}; this server accepts at most {limit}",
            field,
            f"send at most {limit} {field} per request (server setting METASENT_{setting})",
        )


def check_text_lengths(examples: list[LabelledText], limit: int) -> None:
    """Raises a 422 :class:`ApiError` naming ``examples[i].text`` for the first support text longer
    than ``limit`` characters (support texts are stored; the encoder reads only their start)."""
    for i, example in enumerate(examples):
        if len(example.text) > limit:
            raise ApiError(
                422,
                "text_too_long",
                f"support text {i} has {len(example.text)} characters; this server stores at most {limit}",
                f"examples[{i}].text",
                f"send at most {limit} characters per support text (the encoder reads only the first few "
                "hundred tokens; server setting METASENT_MAX_TEXT_CHARS)",
            )


def characters(texts: list[str], examples: list[LabelledText] | None = None) -> int:
    """Characters of ``texts`` and of the support ``examples``' texts: what a request holds
    (:class:`app.limits.CharBudget`)."""
    return sum(map(len, texts)) + sum(len(example.text) for example in examples or [])


def pairs(examples: list[LabelledText]) -> Examples:
    """``(text, label)`` pairs of request examples."""
    return [(ex.text, ex.label) for ex in examples]
