"""Bodies of the audit log: its records, the chain's check, and the query's filters and
paging."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, StringConstraints

from serving.admin.schemas.common import Instant, Name, Strict, encodable

MAX_AUDIT_PAGE = 5000
MAX_PATTERNS = 20
_SEQ_MAX = 2**63 - 1  # the audit log's seq is a 64-bit integer
# Query values hold no control characters (serving.admin.routing refuses them).
Pattern = Annotated[
    str,
    StringConstraints(min_length=1, max_length=300, pattern=r"^[^\x00-\x1f\x7f]+$"),
    AfterValidator(encodable),
]
Seq = Annotated[int, Field(ge=0, le=_SEQ_MAX)]
_PATTERN = "; repeat it for any of several. A value ending in * is a prefix (literal, "
_PATTERN += "case-sensitive), e.g. "


class AuditRecord(BaseModel):
    seq: int
    at: datetime
    actor: str
    action: str
    target: str
    before: Any = Field(description="The target before the change (JSON), or null.")
    after: Any = Field(description="The target after the change (JSON), or null.")
    reason: str
    prev_hash: str
    hash: str


class AuditCheck(BaseModel):
    ok: bool
    records: int
    problem: str = Field(description="The first record changed, inserted or removed.")
    first_bad_seq: int | None
    anchored_seq: int | None = Field(
        default=None,
        description="The newest record this gateway's anchor file holds, found intact; "
        "null when it anchored none.",
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="What the check could not establish, e.g. no anchor on this gateway "
        "to check the end of the log against, or a log not yet sealed with the key.",
    )


class AuditQuery(Strict):
    model: Name | None = Field(
        default=None, description="Only records about this model: its versions and its rollouts."
    )
    since: Instant | None = Field(default=None, description="Only records at or after this time.")
    until: Instant | None = Field(default=None, description="Only records before this time.")
    actor: list[Pattern] = Field(
        default=[], max_length=MAX_PATTERNS, description="Only records by this user" + _PATTERN
        + "ci-*.",
    )  # fmt: skip
    action: list[Pattern] = Field(
        default=[], max_length=MAX_PATTERNS, description="Only records of this action" + _PATTERN
        + "model.promote.*.",
    )  # fmt: skip
    target: list[Pattern] = Field(
        default=[], max_length=MAX_PATTERNS, description="Only records about this target" + _PATTERN
        + "tenant:*.",
    )  # fmt: skip
    after_seq: Seq | None = Field(
        default=None,
        description="Only records after this sequence number (the next page, oldest first).",
    )
    before_seq: Seq | None = Field(
        default=None,
        description="Only records before this sequence number (the next page, newest first).",
    )
    order: Literal["asc", "desc"] = Field(
        default="asc", description="asc: oldest first; desc: newest first."
    )
    limit: Annotated[int, Field(ge=1, le=MAX_AUDIT_PAGE)] = Field(
        default=500,
        description="At most this many records; a full page may have more after it.",
    )
