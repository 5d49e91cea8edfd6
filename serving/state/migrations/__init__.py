"""Alembic's migration environment and revision scripts for the state database.

Run them through :mod:`serving.state.migrate`; ``python -m serving.state.migrations``
is Alembic's command line on these scripts, for writing new revisions.
"""
