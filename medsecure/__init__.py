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
from .directory import (
    CachedDirectory,
    ChainDirectory,
    Directory,
    FhirDirectory,
    FileDirectory,
    MemoryDirectory,
)
from .identifiers import INS
from .models import (
    Code,
    Endpoint,
    KeyEntry,
    Mailbox,
    Organization,
    OrganizationRef,
    Patient,
    Practitioner,
)
from .trust import (
    AuthorityPolicy,
    PinStore,
    Statement,
    TrustDecision,
    TrustPolicy,
    UnsafeAcceptAll,
    UnsafeTrustOnFirstUse,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "AmbiguousPractitioner",
    "AuthorityPolicy",
    "CachedDirectory",
    "ChainDirectory",
    "Code",
    "DeliveryRejected",
    "Directory",
    "DirectoryError",
    "DirectoryUnavailable",
    "Endpoint",
    "EnvelopeError",
    "FhirDirectory",
    "FileDirectory",
    "INS",
    "Identity",
    "IdentityError",
    "KeyChanged",
    "KeyEntry",
    "Mailbox",
    "MedsecureError",
    "MemoryDirectory",
    "NotARecipient",
    "Organization",
    "OrganizationRef",
    "Patient",
    "PinStore",
    "Practitioner",
    "PractitionerNotFound",
    "PublicIdentity",
    "RevokedKey",
    "SenderMismatch",
    "Statement",
    "StorageError",
    "TransportError",
    "TransportUnavailable",
    "TrustDecision",
    "TrustError",
    "TrustPolicy",
    "UnsafeAcceptAll",
    "UnsafeTrustOnFirstUse",
    "Unsealed",
    "UntrustedKey",
    "__version__",
    "seal",
    "seal_stream",
    "unseal",
    "unseal_stream",
]
