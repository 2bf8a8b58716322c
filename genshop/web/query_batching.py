"""Concurrent requests answered together, off the event loop: the API's text search.

``QueryBatcher(answer)`` collects what concurrent requests ask (``await batcher.ask(query)``)
and hands them to ``answer(queries) -> answers`` (one answer, or an exception, per query) on
a worker thread, one batch at a time: while a batch runs, the queries that arrive wait and go
together as the next one. A lone request goes at once (no window to wait out); under load the
batches grow with the load, so 50 concurrent searches cost a few CLIP forwards and index
searches, not 50. The event loop only appends to a list and resolves futures.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from anyio import to_thread

Query = TypeVar("Query")
Answer = TypeVar("Answer")


class QueryBatcher(Generic[Query, Answer]):
    def __init__(self, answer: Callable[[Sequence[Query]], Sequence[Answer | BaseException]], max_batch: int = 64):
        self.answer, self.max_batch = answer, max_batch
        self._waiting: list[tuple[Query, asyncio.Future]] = []
        self._draining = False

    async def ask(self, query: Query) -> Answer:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((query, future))
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[:self.max_batch], self._waiting[self.max_batch:]
                try:
                    answers = await to_thread.run_sync(self.answer, [query for query, _ in batch])
                except Exception as exc:  # noqa: BLE001 - every query of the batch gets the error
                    answers = [exc] * len(batch)
                for (_, future), answer in zip(batch, answers):
                    if future.done():  # the client went away
                        continue
                    if isinstance(answer, BaseException):
                        future.set_exception(answer)
                    else:
                        future.set_result(answer)
        finally:
            self._draining = False
