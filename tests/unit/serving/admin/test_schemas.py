"""Request bodies refuse what JSON could smuggle past a lax number: true is not 1."""

from __future__ import annotations

import pydantic
import pytest

from serving.admin.schemas import NewRollout, NewTenant, Rotation, TenantChange
from serving.rollout import RolloutSpec


@pytest.mark.parametrize("body", [NewTenant, TenantChange])
def test_a_tenant_weight_is_a_number_not_a_boolean(body: type[pydantic.BaseModel]) -> None:
    base = {"name": "acme"} if body is NewTenant else {}
    assert body.model_validate({**base, "weight": 3}).weight == 3.0  # type: ignore[attr-defined]
    assert body.model_validate({**base, "weight": 2.5}).weight == 2.5  # type: ignore[attr-defined]
    for bad in (True, False, "3"):
        with pytest.raises(pydantic.ValidationError, match="weight"):
            body.model_validate({**base, "weight": bad})


@pytest.mark.parametrize(
    ("field", "good"),
    [
        ("interval_s", 5),
        ("max_error_rate", 0.5),
        ("max_p99_ratio", 2),
        ("min_requests", 10),
        ("failure_threshold", 3),
        ("mirror_pct", 10),
        ("min_agreement", 1),
        ("min_deadline_ms", 100),
    ],
)
def test_rollout_settings_are_numbers_not_booleans(field: str, good: float) -> None:
    assert getattr(RolloutSpec.model_validate({field: good}), field) == good
    with pytest.raises(pydantic.ValidationError, match=field):
        NewRollout.model_validate({"version": "2", field: True})


def test_rollout_steps_are_numbers_not_booleans() -> None:
    assert RolloutSpec.model_validate({"steps": [5, 50]}).steps == (5, 50, 100)
    with pytest.raises(pydantic.ValidationError, match="steps"):
        RolloutSpec.model_validate({"steps": [True, 50]})


def test_a_flag_is_a_boolean_not_a_number() -> None:
    assert Rotation.model_validate({"never_expires": True}).never_expires
    for bad in (1, 0, "true"):
        with pytest.raises(pydantic.ValidationError, match="never_expires"):
            Rotation.model_validate({"never_expires": bad})
