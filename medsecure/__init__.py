"""medsecure: send health documents end to end encrypted, signed and traceable.

The public surface is what this module lists in ``__all__``; everything else lives in private
modules and may change without notice.
"""

from ._document import Document
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
from ._home import ConfigError, client_from_home, default_client, init_home, send
from ._identity import Identity, PublicIdentity
from .client import (
    Client,
    OutboxEntry,
    QuarantinedEnvelope,
    ReceivedDocument,
    ReceivedMessage,
    RecipientStatus,
    SendResult,
)
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
from .transports import FileTransport, MockTransport, Transport
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
    "Client",
    "Code",
    "ConfigError",
    "DeliveryRejected",
    "Directory",
    "DirectoryError",
    "DirectoryUnavailable",
    "Document",
    "Endpoint",
    "EnvelopeError",
    "FhirDirectory",
    "FileDirectory",
    "FileTransport",
    "INS",
    "Identity",
    "IdentityError",
    "KeyChanged",
    "KeyEntry",
    "Mailbox",
    "MedsecureError",
    "MemoryDirectory",
    "MockTransport",
    "NotARecipient",
    "Organization",
    "OrganizationRef",
    "OutboxEntry",
    "Patient",
    "PinStore",
    "Practitioner",
    "PractitionerNotFound",
    "PublicIdentity",
    "QuarantinedEnvelope",
    "ReceivedDocument",
    "ReceivedMessage",
    "RecipientStatus",
    "RevokedKey",
    "SendResult",
    "SenderMismatch",
    "Statement",
    "StorageError",
    "Transport",
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
    "client_from_home",
    "default_client",
    "init_home",
    "seal",
    "seal_stream",
    "send",
    "unseal",
    "unseal_stream",
]
