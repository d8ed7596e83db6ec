"""medsecure: send health documents end to end encrypted, signed and traceable.

The public surface is what this module lists in ``__all__``; everything else lives in private
modules and may change without notice.
"""

from ._envelope import Unsealed, seal, seal_stream, unseal, unseal_stream
from ._errors import (
    AmbiguousPractitioner,
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
    UntrustedKey,
)
from ._identity import Identity, PublicIdentity

__version__ = "0.1.0.dev0"

__all__ = [
    "AmbiguousPractitioner",
    "DeliveryRejected",
    "DirectoryError",
    "DirectoryUnavailable",
    "EnvelopeError",
    "Identity",
    "IdentityError",
    "KeyChanged",
    "MedsecureError",
    "NotARecipient",
    "PractitionerNotFound",
    "PublicIdentity",
    "RevokedKey",
    "SenderMismatch",
    "StorageError",
    "TransportError",
    "TransportUnavailable",
    "TrustError",
    "Unsealed",
    "UntrustedKey",
    "__version__",
    "seal",
    "seal_stream",
    "unseal",
    "unseal_stream",
]
