"""Celery face of GenShop: the app (``workers.app``) and thin tasks (``workers.tasks``)."""
