"""The one table from errors to HTTP statuses and exit codes, and the CLI's agreement
with it."""

from __future__ import annotations

import pydantic
import pytest
import sqlalchemy as sa
from fastapi.exceptions import RequestValidationError

import serving.cli.client as cli_client
import serving.cli.users as cli_users
from serving.admin import ANSWERS, EXIT_FAILED, Unauthenticated, answer_for, exit_code_for
from serving.admin.errors import validation_message
from serving.costs import ReportError
from serving.registry import (
    ApprovalError,
    ArtifactTooLarge,
    GuardrailRefused,
    RegistryError,
    UploadMismatch,
    VersionNotFoundError,
)
from serving.rollout import NoRollout, RolloutError
from serving.state import SchemaBehindError
from serving.tenancy import ADMIN_TOKEN_FILE, ROLES, Forbidden, TenantNotFoundError, UserError


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (RequestValidationError([]), 400),
        (ValueError("bad name"), 400),
        (ReportError("bad day"), 400),
        (RegistryError("no signature"), 400),
        (UploadMismatch("changed in transit"), 400),
        (UserError("x"), 400),
        (Unauthenticated("unknown user token"), 401),
        (Forbidden("may not"), 403),  # a UserError, answered as its own class
        (VersionNotFoundError("x"), 404),
        (TenantNotFoundError("x"), 404),
        (NoRollout("x"), 404),  # a RolloutError, which is a RegistryError
        (RolloutError("x"), 409),
        (ApprovalError("x"), 409),
        (GuardrailRefused("payload", "a pickle"), 409),
        (ArtifactTooLarge("over"), 413),  # a GuardrailRefused
        (SchemaBehindError("old", "a", "b"), 503),
        (sa.exc.OperationalError("SELECT 1", {}, Exception("down")), 503),
    ],
)
def test_the_most_specific_class_answers(error: Exception, status: int) -> None:
    found = answer_for(error)
    assert found is not None and found.status == status
    assert exit_code_for(error) == EXIT_FAILED


def test_the_gateways_own_data_failing_validation_is_its_fault() -> None:
    with pytest.raises(pydantic.ValidationError) as raised:
        pydantic.TypeAdapter(int).validate_python("not a number")
    found = answer_for(raised.value)  # a ValueError, but not the caller's
    assert found is not None and found.status == 500 and found.message is not None


def test_an_error_outside_the_table_is_not_answered() -> None:
    assert answer_for(KeyError("bug")) is None and exit_code_for(RuntimeError()) is None


def test_every_answer_is_an_error_status_and_a_failed_exit() -> None:
    # The CLI exits with EXIT_FAILED for any error answer of the gateway: that is what
    # the table gives every error, so the two agree without the CLI loading the table.
    assert cli_client.EXIT_FAILED == EXIT_FAILED
    for cls, answer in ANSWERS.items():
        assert issubclass(cls, Exception)
        assert 400 <= answer.status < 600 and answer.exit_code == EXIT_FAILED, cls


def test_the_cli_shares_the_servers_names() -> None:
    assert cli_client.ADMIN_TOKEN_FILE == ADMIN_TOKEN_FILE
    assert cli_users.ROLES == ROLES


def test_validation_errors_name_each_field() -> None:
    errors = [
        {"loc": ("body", "steps"), "msg": "Value error, steps must increase"},
        {"loc": ("query", "colour"), "msg": "Extra inputs are not permitted"},
        {"type": "json_invalid", "loc": ("body", 1), "ctx": {"error": "Expecting value"}},
    ]
    assert validation_message(errors) == (
        "invalid request: body.steps: Value error, steps must increase; query.colour: Extra "
        "inputs are not permitted; body: malformed JSON (Expecting value)"
    )
    many = [{"loc": ("body", f"f{i}"), "msg": "bad"} for i in range(7)]
    assert validation_message(many).endswith("body.f4: bad (and 2 more)")
