"""The web console (``/console/`` on the HTTP port): models, approvals, rollouts, costs,
tenants, the audit log and an overview, for signed-in users, over the admin API."""

from serving.console.app import console_app

__all__ = ["console_app"]
