"""medsecure: send health documents end to end encrypted, signed and traceable.

The top level holds what most programs need: the envelope functions, identities, ``Document``,
the client and its results, and the error tree. Everything else lives in public subpackages:

* :mod:`medsecure.envelope` — the envelope core (the same functions as the top level)
* :mod:`medsecure.directory` — directories (memory, file, FHIR Annuaire Santé, cached, chained)
* :mod:`medsecure.transports` — transports (drop folder, mock, relay, mail)
* :mod:`medsecure.trust` — trust policies, statements and pins
* :mod:`medsecure.models` — practitioners, organizations, patients, endpoints, codes
* :mod:`medsecure.identifiers` — RPPS, ADELI, FINESS, SIRET, IDNPS, INS
* :mod:`medsecure.audit` — the tamper-evident audit log
* :mod:`medsecure.client` — the client's other result types
* :mod:`medsecure.mail` — mail formats (end to end, MSSanté, IHE XDM, MDN/DSN) and drivers
* :mod:`medsecure.relay` — the relay protocol (the server is the extra ``relay``)

Names are loaded on first use, so ``import medsecure`` stays cheap for a command that only
seals a file.
"""

import importlib as _importlib
import typing as _typing
import warnings as _warnings

from ._errors import (
    AmbiguousPractitioner,
    ConfigError,
    DeliveryRejected,
    DirectoryError,
    DirectoryUnavailable,
    EnvelopeError,
    IdentityError,
    KeyChanged,
    MedsecureError,
    NotARecipient,
    PractitionerNotFound,
    RevokedKey,
    SenderMismatch,
    StorageError,
    TransportError,
    TransportUnavailable,
    TrustError,
    UnknownMessage,
    UntrustedKey,
)

if _typing.TYPE_CHECKING:
    from ._aclient import AsyncClient
    from ._client import Client
    from ._document import Document
    from ._home import client_from_home, default_client, init_home, send
    from ._identity import Identity, PublicIdentity
    from ._results import ReceivedMessage, RecipientStatus, SendResult
    from .envelope import Unsealed, seal, seal_stream, unseal, unseal_stream

__version__ = "0.1.0.dev0"

__all__ = [
    "AmbiguousPractitioner",
    "AsyncClient",
    "Client",
    "ConfigError",
    "DeliveryRejected",
    "DirectoryError",
    "DirectoryUnavailable",
    "Document",
    "EnvelopeError",
    "Identity",
    "IdentityError",
    "KeyChanged",
    "MedsecureError",
    "NotARecipient",
    "PractitionerNotFound",
    "PublicIdentity",
    "ReceivedMessage",
    "RecipientStatus",
    "RevokedKey",
    "SendResult",
    "SenderMismatch",
    "StorageError",
    "TransportError",
    "TransportUnavailable",
    "TrustError",
    "UnknownMessage",
    "Unsealed",
    "UntrustedKey",
    "__version__",
    "client_from_home",
    "default_client",
    "init_home",
    "seal",
    "seal_stream",
    "send",
    "unseal",
    "unseal_stream",
]

# Public names loaded on first use: name -> private module that defines it.
_LAZY = {
    "AsyncClient": "._aclient",
    "Client": "._client",
    "Document": "._document",
    "Unsealed": ".envelope",
    "seal": ".envelope",
    "seal_stream": ".envelope",
    "unseal": ".envelope",
    "unseal_stream": ".envelope",
    "client_from_home": "._home",
    "default_client": "._home",
    "init_home": "._home",
    "send": "._home",
    "Identity": "._identity",
    "PublicIdentity": "._identity",
    "ReceivedMessage": "._results",
    "RecipientStatus": "._results",
    "SendResult": "._results",
}

# Names that used to be exported here, and the public module that holds them now. They still
# work, with a DeprecationWarning, until 0.2.
_MOVED = {
    **dict.fromkeys(
        (
            "AuthorityPolicy",
            "PinStore",
            "Statement",
            "TrustDecision",
            "TrustPolicy",
            "UnsafeAcceptAll",
            "UnsafeTrustOnFirstUse",
        ),
        "medsecure.trust",
    ),
    **dict.fromkeys(
        (
            "CachedDirectory",
            "ChainDirectory",
            "Directory",
            "FhirDirectory",
            "FileDirectory",
            "MemoryDirectory",
        ),
        "medsecure.directory",
    ),
    **dict.fromkeys(
        (
            "Code",
            "Endpoint",
            "KeyEntry",
            "Mailbox",
            "Organization",
            "OrganizationRef",
            "Patient",
            "Practitioner",
        ),
        "medsecure.models",
    ),
    "INS": "medsecure.identifiers",
    **dict.fromkeys(("FileTransport", "MockTransport", "Transport"), "medsecure.transports"),
    **dict.fromkeys(
        ("OutboxEntry", "QuarantinedEnvelope", "ReceivedDocument", "StatusEvent"),
        "medsecure.client",
    ),
}


_SUBMODULES = frozenset(
    (
        "audit",
        "cli",
        "client",
        "directory",
        "envelope",
        "identifiers",
        "mail",
        "models",
        "relay",
        "transports",
        "trust",
    )
)


def __getattr__(name: str) -> _typing.Any:
    if name in _SUBMODULES:  # ``import medsecure; medsecure.trust.AuthorityPolicy`` works
        return _importlib.import_module(f"{__name__}.{name}")
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(_importlib.import_module(module, __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    home = _MOVED.get(name)
    if home is not None:
        _warnings.warn(
            f"medsecure.{name} moved to {home}.{name}; the old name goes away in 0.2",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(_importlib.import_module(home), name)
    raise AttributeError(f"module 'medsecure' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(globals()))
