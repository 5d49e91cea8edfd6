"""The admin HTTP API: users' tokens, roles, and the routes of every admin action."""

from serving.admin.api import UserBackend, blocking, core_routes, parse_since
from serving.admin.registry_routes import model_routes

__all__ = ["UserBackend", "blocking", "core_routes", "model_routes", "parse_since"]
