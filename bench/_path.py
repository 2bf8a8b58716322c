"""Imported first by every bench script: drop bench/ from sys.path, because bench/queue.py
(the name the queue benchmark must have) would otherwise shadow the stdlib's ``queue``,
which torch and kombu import."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
