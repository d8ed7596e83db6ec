"""The envelope, format v1: a sans-I/O core that seals and opens bytes and streams.

Everything the wire format is made of lives in this folder, below every other part of
medsecure (it knows nothing of practitioners, directories, transports or models, and imports
none of them — nor pydantic or httpx):

* ``_labels`` — every label and constant of docs/format.md (and of the other specs), verbatim;
* ``_cbor`` — the one strict canonical CBOR codec for untrusted bytes (docs/format.md §8);
* ``_stream`` — STREAM framing: chunks, nonces, the payload digest (§4.4, §4.6);
* ``_seal`` — the header, key schedule, signatures: :func:`seal`, :func:`unseal` and their
  streaming forms (§2–§5);
* ``_message`` — the message plaintext the client seals: manifest and documents (§10).

The public functions are also available at the top level (``medsecure.seal`` …). Names load on
first use: the identity module imports the codec and the labels from here, and the sealing code
imports the identities, so loading them eagerly would make the two packages wait on each other.
"""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
    from ._seal import Unsealed, seal, seal_stream, unseal, unseal_stream

__all__ = ["Unsealed", "seal", "seal_stream", "unseal", "unseal_stream"]


def __getattr__(name: str) -> _typing.Any:
    if name in __all__:
        value = getattr(_importlib.import_module("._seal", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(globals()))
