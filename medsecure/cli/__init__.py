"""The ``medsecure`` command (extra ``cli``).

Every failure prints exactly one line on stderr (``medsecure: error: …``) and exits non-zero;
no traceback is ever shown and no partial output file is left behind (outputs are written to a
temporary file beside the target and renamed into place once complete).

Start-up: the key and envelope commands (``keygen``, ``pubkey``, ``seal``, ``unseal``, in
``_keys``) load only the core — no pydantic, httpx, client or directory. The modules of the other
commands (``_client``, ``_directory``, ``_relay``) register themselves when imported, which
happens only when one of their commands runs, or for the full command list (``medsecure``,
``medsecure --help``).
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
    from . import _keys  # noqa: F401 - keygen, pubkey, seal, unseal: they need only the core
    from ._app import cli, run

    args = sys.argv[1:] if argv is None else list(argv)
    # The group takes no option with a value, so a leading word is the command's name.
    name = args[0] if args and not args[0].startswith("-") else None
    if name not in cli.commands:
        from . import _client, _directory, _relay  # noqa: F401 - register their commands

    del click
    return run(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
