"""Request and response bodies of the REST API."""

from __future__ import annotations

import unicodedata
from typing import Annotated, Literal

import regex
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

# Code points that print nothing on their own, by Unicode property: default-ignorable (zero-width
# space and joiners, BOM, Hangul fillers U+3164/U+FFA0, variation selectors, tag characters...),
# format (Cf: bidi marks, U+180E...), control (Cc), separators and other white space (Z*,
# White_Space), and combining marks (M*), which show only on a base character. U+2800 BRAILLE
# PATTERN BLANK is a symbol (So) with no such property, yet prints as a blank: the one addition.
_INVISIBLE = regex.compile(r"[\p{Default_Ignorable_Code_Point}\p{Cf}\p{Cc}\p{Z}\p{White_Space}\p{M}\u2800]")
# what labels lose before they are compared and stored (marks and spaces inside a label stay)
_LABEL_INVISIBLE = regex.compile(r"[\p{Default_Ignorable_Code_Point}\p{Cf}\p{Cc}]")


def visible_part(value: str) -> str:
    """``value`` without its invisible code points (see ``_INVISIBLE``): empty when nothing in it
    would print."""
    return _INVISIBLE.sub("", value)


def text_problem(value: str) -> str | None:
    """Why the API refuses ``value`` as a text or label (422), or None when it accepts it (the
    check of every text field; ``metasent classify --output`` uses it to keep such rows unsent)."""
    if not visible_part(value):
        return (
            "must contain a visible character, not only whitespace, zero-width, format, filler or combining "
            "characters (e.g. U+200B, U+3164, U+2800, a lone U+0301); send the text itself"
        )
    if "\x00" in value:  # no database text column (PostgreSQL) can store it
        return "must not contain a NUL character"
    return None


def normalise_label(label: str) -> str:
    """The label as it is compared and stored: NFC, without default-ignorable, format and control
    code points, surrounding white space stripped (``"pos\\u200b"`` and ``" pos"`` are ``"pos"``)."""
    return unicodedata.normalize("NFC", _LABEL_INVISIBLE.sub("", label)).strip()


def _not_blank(value: str) -> str:
    problem = text_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _label(value: str) -> str:
    return normalise_label(_not_blank(value))


NonBlank = Annotated[StrictStr, Field(min_length=1), AfterValidator(_not_blank)]
Name = Annotated[StrictStr, Field(min_length=1, max_length=200), AfterValidator(_not_blank)]
Label = Annotated[StrictStr, Field(min_length=1, max_length=200), AfterValidator(_label)]


class LabelledText(BaseModel):
    """One support example."""

    model_config = ConfigDict(extra="forbid")
    text: NonBlank = Field(
        description="the review text (truncated to the encoder's token limit); at most METASENT_MAX_TEXT_CHARS "
        "characters (20000 by default), longer answers 422"
    )
    label: Label = Field(
        description="its label name, e.g. 'positive'; compared and stored in NFC without invisible code points "
        "(zero-width, format, control) and surrounding spaces"
    )


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
    name: Name = Field(description="a name for the domain")
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


class EstimatedAccuracy(BaseModel):
    """How well the domain is expected to classify new texts, from its support set alone."""

    accuracy: float = Field(description="held-out accuracy over the support set, in [0, 1]")
    low: float = Field(description="lower end of its 95% interval (Wilson), in [0, 1]")
    high: float = Field(description="upper end of its 95% interval (Wilson), in [0, 1]")
    n: int = Field(description="held-out predictions counted: support examples of labels with at least 2")
    method: str = Field(
        description="'leave-one-out' (no inner step: exact, at almost no cost) or '<F>-fold' (the inner loop is "
        "re-run on each fold's other examples)"
    )
    seconds: float = Field(description="wall time of the estimate, seconds, beside the adaptation's own")


class SupportWarning(BaseModel):
    """Something about the support set to fix before relying on the domain."""

    code: str = Field(description="few_examples, no_estimate or unbalanced_labels")
    message: str


class AdaptationInfo(BaseModel):
    steps: int = Field(description="inner-loop SGD steps")
    seconds: float = Field(description="wall time of the adaptation, seconds")
    device: str
    support_accuracy: float = Field(
        description="accuracy of the adapted model on its own support set (optimistic: it was built from "
        "those examples; see estimated_accuracy)"
    )
    estimated_accuracy: EstimatedAccuracy | None = Field(
        default=None,
        description="held-out estimate of the accuracy on new texts (cross-validation over the support set "
        "with the same inner loop); null when no label has 2 examples, or for domains adapted before it existed",
    )


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
    warnings: list[SupportWarning] = Field(
        default_factory=list, description="what to fix in the support set (few examples of a label, unbalanced labels)"
    )


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
    warnings: list[SupportWarning] = Field(default_factory=list, description="what to fix in the support set")


class SuggestRequest(BaseModel):
    """Unlabelled texts to choose the next ones to label from."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "texts": [
                        "the olive oil was fine i guess",
                        "arrived quickly, tastes ok",
                        "mouldy bread, never again",
                    ],
                    "k": 2,
                }
            ]
        },
    )
    texts: list[NonBlank] = Field(min_length=1, description="unlabelled candidate texts (at most METASENT_MAX_TEXTS)")
    k: StrictInt = Field(default=5, ge=1, le=100, description="how many texts to suggest")


class SuggestedText(BaseModel):
    index: int = Field(description="position of the text in the request's texts")
    text: str
    label: str = Field(description="the domain's current prediction for it")
    scores: dict[str, float] = Field(description="probability per label, summing to 1")
    uncertainty: float = Field(description="1 - the largest probability")


class SuggestResponse(BaseModel):
    domain_id: str
    method: str = Field(description="how the texts were chosen")
    suggestions: list[SuggestedText] = Field(
        description="the texts to label next, in the order chosen; fewer than k when fewer distinct texts "
        "not already in the support set were sent"
    )


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
    encoder: str | None = Field(default=None, description="the encoder's hub id, or its directory's name only")
    checkpoint_hash: str | None = Field(default=None, description="sha256 of the model, recorded with each domain")
    device: str | None = None


class Readiness(BaseModel):
    status: str = Field(description="ready or not_ready")
    model_loaded: bool
    store_reachable: bool
