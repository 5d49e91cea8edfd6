"""The admin API (FastAPI, mounted at ``/admin``): users' tokens, roles, and the routes
of every admin action; and the one table from errors to HTTP statuses and the CLI's
exit codes."""

from serving.admin.app import admin_app, build_admin_app
from serving.admin.errors import (
    ANSWERS,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    AdminError,
    Answer,
    DirectoryUnavailable,
    Unauthenticated,
    answer_for,
    exit_code_for,
)
from serving.admin.routing import MAX_JSON_BODY, SIGNED_IN
from serving.admin.services import AdminServices

__all__ = [
    "ANSWERS",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "MAX_JSON_BODY",
    "SIGNED_IN",
    "AdminError",
    "AdminServices",
    "Answer",
    "DirectoryUnavailable",
    "Unauthenticated",
    "admin_app",
    "answer_for",
    "build_admin_app",
    "exit_code_for",
]
