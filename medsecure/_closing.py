"""``with`` and ``async with`` for the classes that hold a resource, defined once.

A class that releases what it holds in ``close()`` derives from :class:`Closing` (``aclose()``:
:class:`AsyncClosing`): ``with x:`` then gives ``x`` itself and closes it when the block ends,
whether it ended normally or by an exception (which is never swallowed).
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

__all__ = ["AsyncClosing", "Closing"]


class Closing:
    """``with x:`` gives ``x`` and calls ``x.close()`` at the end of the block."""

    def close(self) -> None:
        """Release resources (nothing here: subclasses that hold some override this)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClosing:
    """``async with x:`` gives ``x`` and awaits ``x.aclose()`` at the end of the block."""

    async def aclose(self) -> None:
        """Release resources (nothing here: subclasses that hold some override this)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
