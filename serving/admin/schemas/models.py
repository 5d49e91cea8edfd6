"""Bodies of the model registry: versions with their signature, lineage and approvals,
uploads, stage changes, and a version's card with its standing against production."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, StringConstraints

from serving.admin.schemas.common import Name, Reason, Strict, Text, encodable

Stage = Literal["registered", "approved", "rejected", "staging", "production", "archived"]


class Tensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class Signature(BaseModel):
    inputs: list[Tensor]
    outputs: list[Tensor]


class Lineage(BaseModel):
    parent_version: str | None
    source_uri: str | None
    dataset_digest: str | None
    code_revision: str | None


class Version(BaseModel):
    name: str
    version: str
    format: str
    sha256: str
    size_bytes: int
    model_class: str | None
    model_kwargs: dict[str, Any]
    signature: Signature
    metrics: dict[str, float]
    lineage: Lineage
    author: str
    created_at: datetime
    stage: str
    stage_changed_at: datetime


class Approval(BaseModel):
    approver: str
    decision: Literal["approve", "reject"]
    reason: str
    at: datetime


class VersionDetail(Version):
    approvals: list[Approval]


class Decision(Strict):
    reason: Reason


class Promotion(Strict):
    to: Literal["staging", "production"]


Tensors = list[Annotated[str, StringConstraints(max_length=512), AfterValidator(encodable)]]


class NewVersion(Strict):
    """Query parameters of an upload; the body is the artifact's bytes."""

    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] = Field(
        description="The artifact's sha256, as the sender computed it; the upload is "
        "refused if the bytes received hash otherwise."
    )
    format: Literal["torchscript", "export", "safetensors"]
    model_class: Annotated[str, StringConstraints(max_length=300)] | None = Field(
        default=None, description="For safetensors: 'package.module:Class'."
    )
    model_kwargs: Annotated[str, StringConstraints(max_length=4096)] | None = Field(
        default=None, description="JSON object of keyword arguments for model_class."
    )
    input: Tensors = Field(
        default=[], max_length=64, description="NAME:DATATYPE:DIMS, e.g. pixels:FP32:64."
    )
    output: Tensors = Field(default=[], max_length=64, description="NAME:DATATYPE:DIMS.")
    metric: Tensors = Field(
        default=[], max_length=64, description="NAME=VALUE, e.g. accuracy=0.97."
    )
    parent: Name | None = Field(default=None, description="The version it derives from.")
    source: Text | None = Field(default=None, description="URI of the run that produced it.")
    dataset_digest: Annotated[Text, StringConstraints(max_length=200)] | None = None
    code_revision: Annotated[Text, StringConstraints(max_length=200)] | None = None
    version: Name | None = Field(default=None, description="Default: the next integer.")


class MetricComparison(BaseModel):
    metric: str
    value: float | None = Field(description="The version's; null: it has none.")
    production: float | None = Field(description="Production's; null: it has none.")
    delta: float | None = Field(description="value - production.")
    higher_is_better: bool | None = Field(description="The policy's rule; null: no rule.")
    max_regression: float | None
    passes: bool | None = Field(
        description="Whether the metrics guardrail lets it through; null: not checked (no "
        "rule, or production has no such metric)."
    )


class Refusal(BaseModel):
    check: str
    reason: str


class AgainstProduction(BaseModel):
    """The checks a promotion to production would run now, with the gateway's policy."""

    production_version: str
    metrics: list[MetricComparison]
    signature_compatible: bool
    passes: bool = Field(description="Signature and metrics guardrails both pass.")
    refusal: Refusal | None = Field(description="The first that would refuse it; null: none.")


class GuardrailRefusal(BaseModel):
    seq: int = Field(description="The audit record's.")
    at: datetime
    actor: str
    target: str
    check: str
    during: str | None = Field(description="register, or promote:STAGE.")
    reason: str


class VersionCard(VersionDetail):
    against_production: AgainstProduction | None = Field(
        description="null: the model has no production version, or this is it."
    )
    guardrail_refusals: list[GuardrailRefusal] = Field(
        description="The guardrails' refusals about this version, oldest first."
    )
