"""Request and response bodies of the REST API."""

from __future__ import annotations

import unicodedata
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator


def _invisible(char: str) -> bool:
    """Whitespace, or a format character (Unicode category Cf: zero-width space U+200B, (non-)joiners
    U+200C/U+200D, word joiner U+2060, BOM U+FEFF, bidi marks...), which print nothing."""
    return char.isspace() or unicodedata.category(char) == "Cf"


def text_problem(value: str) -> str | None:
    """Why the API refuses ``value`` as a text or label (422), or None when it accepts it (the
    check of every text field; ``metasent classify --output`` uses it to keep such rows unsent)."""
    if all(_invisible(char) for char in value):
        return (
            "must contain a visible character, not only whitespace or zero-width characters "
            "(e.g. U+200B); send the text itself"
        )
    if "\x00" in value:  # no database text column (PostgreSQL) can store it
        return "must not contain a NUL character"
    return None


def _not_blank(value: str) -> str:
    problem = text_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


NonBlank = Annotated[StrictStr, Field(min_length=1), AfterValidator(_not_blank)]
Label = Annotated[StrictStr, Field(min_length=1, max_length=200), AfterValidator(_not_blank)]


class LabelledText(BaseModel):
    """One support example."""

    model_config = ConfigDict(extra="forbid")
    text: NonBlank = Field(
        description="the review text (truncated to the encoder's token limit); at most METASENT_MAX_TEXT_CHARS "
        "characters (20000 by default), longer answers 422"
    )
    label: Label = Field(description="its label name, e.g. 'positive'")


class CreateDomain(BaseModel):
    """A support set to adapt a new domain on: at least 2 distinct labels, any names."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "gourmet food",
                    "examples": [
                        {"text": "delicious coffee, rich and smooth, will buy again", "label": "positive"},
                        {"text": "the best dark chocolate i have had in years", "label": "positive"},
                        {
                            "text": "stale crackers, arrived broken and tasted of cardboard",
                            "label": "negative",
                        },
                        {"text": "way too salty and the tea bags leaked", "label": "negative"},
                    ],
                }
            ]
        },
    )
    name: Label = Field(description="a name for the domain")
    examples: list[LabelledText] = Field(min_length=2, description="the support set")

    @field_validator("examples")
    @classmethod
    def _two_labels(cls, examples: list[LabelledText]) -> list[LabelledText]:
        return require_two_labels(examples)


def require_two_labels(examples: list[LabelledText]) -> list[LabelledText]:
    """``examples`` unchanged.

    Raises:
        ValueError: when they have fewer than 2 distinct labels.
    """
    if len({ex.label for ex in examples}) < 2:
        raise ValueError("examples need at least 2 distinct labels")
    return examples


class UpdateExamples(BaseModel):
    """New support examples for a domain; the domain is re-adapted on the resulting set."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "examples": [{"text": "the honey had crystallised into a brick", "label": "negative"}],
                    "mode": "add",
                    "expected_version": 1,
                }
            ]
        },
    )
    examples: list[LabelledText] = Field(min_length=1, description="examples to add, or the whole new support set")
    mode: Literal["add", "replace"] = Field(
        default="add", description="'add' appends to the stored support set, 'replace' replaces it"
    )
    expected_version: StrictInt | None = Field(
        default=None,
        ge=1,
        description="the version you read, a JSON integer; the update is refused (409) if it changed since",
    )


class AdaptationInfo(BaseModel):
    steps: int = Field(description="inner-loop SGD steps")
    seconds: float = Field(description="wall time of the adaptation, seconds")
    device: str
    support_accuracy: float = Field(description="accuracy of the adapted model on the support set")


class Domain(BaseModel):
    domain_id: str
    name: str
    labels: list[str] = Field(description="label names; the order of first appearance in the support set")
    num_examples: int
    version: int = Field(description="1 at creation, +1 for each change of the support set")
    checkpoint_hash: str = Field(description="sha256 of the model the domain was adapted with")
    stale: bool = Field(description="adapted with another model than the server's; re-adapted on next use")
    created_at: str
    updated_at: str
    adaptation: AdaptationInfo


class DomainExamples(BaseModel):
    domain_id: str
    version: int
    examples: list[LabelledText] = Field(description="the stored support set")


class DomainList(BaseModel):
    domains: list[Domain]


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"texts": ["lovely olive oil, fresh and peppery", "the jam was mouldy"]}]},
    )
    texts: list[NonBlank] = Field(min_length=1, description="texts to classify")


class AdaptAndClassify(BaseModel):
    """A support set and texts: adapt, classify and forget (nothing is stored)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "examples": [
                        {"text": "delicious coffee, rich and smooth", "label": "positive"},
                        {"text": "stale crackers that tasted of cardboard", "label": "negative"},
                    ],
                    "texts": ["lovely olive oil, fresh and peppery", "the jam was mouldy"],
                }
            ]
        },
    )
    examples: list[LabelledText] = Field(min_length=2, description="the support set")
    texts: list[NonBlank] = Field(min_length=1, description="texts to classify")

    @field_validator("examples")
    @classmethod
    def _two_labels(cls, examples: list[LabelledText]) -> list[LabelledText]:
        return require_two_labels(examples)


class Prediction(BaseModel):
    label: str
    scores: dict[str, float] = Field(description="probability per label, summing to 1")
    truncated: bool = Field(
        default=False, description="whether the text was longer than the encoder's token limit and was cut to it"
    )


class ClassifyResponse(BaseModel):
    domain_id: str
    predictions: list[Prediction] = Field(description="one per input text, in input order")


class AdaptAndClassifyResponse(BaseModel):
    labels: list[str] = Field(description="label names; the order of first appearance in the support set")
    predictions: list[Prediction] = Field(description="one per input text, in input order")
    adaptation: AdaptationInfo


class ErrorDetail(BaseModel):
    field: str = Field(description="where the problem is, e.g. 'examples[2].label'")
    message: str
    fix: str = Field(description="what to change")


class ErrorBody(BaseModel):
    code: str
    message: str
    details: list[ErrorDetail] = []


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: str
    model_loaded: bool
    model: str | None = Field(default=None, description="the model's name; null for the un-meta-trained encoder")
    algorithm: str | None = None
    encoder: str | None = None
    checkpoint: str | None = Field(default=None, description="the checkpoint directory; null: the bare encoder")
    checkpoint_hash: str | None = Field(default=None, description="sha256 of the model, recorded with each domain")
    device: str | None = None
    domains: int | None = Field(default=0, description="stored domains of every tenant; null when the store is down")


class Readiness(BaseModel):
    status: str = Field(description="ready or not_ready")
    model_loaded: bool
    store_reachable: bool
