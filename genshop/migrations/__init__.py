"""Alembic migrations of the store's schema (``genshop db upgrade``); shipped inside the package."""
