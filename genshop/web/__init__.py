"""The designers' web front: a FastAPI app (``genshop serve``) with the HTTP API and the gallery page."""
