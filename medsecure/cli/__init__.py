"""The ``medsecure`` command (extra ``cli``).

Every failure prints exactly one line on stderr (``medsecure: error: …``) and exits non-zero;
no traceback is ever shown and no partial output file is left behind (outputs are written to a
temporary file beside the target and renamed into place once complete).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medsecure`` command; returns the exit status."""
    try:
        import click
    except ImportError:  # pragma: no cover - depends on the installed extras
        print(
            "medsecure: error: the command line needs the 'cli' extra: "
            "pip install 'medsecure[cli]'",
            file=sys.stderr,
        )
        return 2
    from . import _client, _directory, _keys, _relay  # noqa: F401 - register their commands
    from ._app import run

    del click
    return run(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
