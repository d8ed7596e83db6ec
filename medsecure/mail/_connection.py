"""What the IMAP and SMTP drivers share: one reused connection to a mail server.

:class:`MailConnection` holds the server settings, their TLS context, the connection (opened on
first use, reopened after it broke), a lock that serialises its use, and the count of
connections opened (so that callers and tests see reuse). Closing says goodbye to the server
(LOGOUT, QUIT) with errors ignored; dropping a broken connection says nothing. Each driver says
how to open, greet and cut its protocol's connection.
"""

from __future__ import annotations

import abc
import threading
from typing import ClassVar, Generic, Literal, TypeVar

from .._closing import Closing
from ._config import MailServer, tls_context

__all__ = ["MailConnection"]

C = TypeVar("C")


class MailConnection(Closing, Generic[C], abc.ABC):
    """One reused connection of type ``C`` to ``server`` (see the module docstring)."""

    #: Which of the server's ports this driver uses.
    protocol: ClassVar[Literal["smtp", "imap"]]

    def __init__(self, server: MailServer) -> None:
        if not isinstance(server, MailServer):
            raise TypeError("server must be a MailServer")
        self.server = server
        self._context = tls_context(server)
        self._conn: C | None = None
        self._lock = threading.RLock()
        #: Connections opened so far (lets callers and tests see reuse).
        self.connections = 0

    def __repr__(self) -> str:
        where = f"{self.server.host}:{self.server.port_for(self.protocol)}"
        return f"<{type(self).__name__} {where}{self._detail()}>"

    def _detail(self) -> str:
        """More for :meth:`__repr__` (never a secret)."""
        return ""

    @abc.abstractmethod
    def _connect(self) -> C:
        """Open, secure and authenticate a new connection."""

    @abc.abstractmethod
    def _goodbye(self, conn: C) -> None:
        """End a connection politely (LOGOUT, QUIT), ignoring errors."""

    @abc.abstractmethod
    def _cut(self, conn: C) -> None:
        """Close a connection without a word to the server, ignoring errors."""

    def _opened(self) -> tuple[C, bool]:
        """The connection (opened now if there is none) and whether it is a reused one."""
        if self._conn is not None:
            return self._conn, True
        self._conn = self._connect()
        return self._conn, False

    def _drop(self) -> None:
        """Forget a connection that broke (or is in an unknown state): the next use reopens."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._cut(conn)

    def close(self) -> None:
        """Say goodbye to the server and close the connection (errors ignored: nothing is
        pending then). The object stays usable: the next use opens a new connection."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                self._goodbye(conn)
