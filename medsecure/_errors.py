"""The exception tree of medsecure.

Every error medsecure raises on purpose is a :class:`MedsecureError`::

    MedsecureError
    ├── EnvelopeError ── NotARecipient, SenderMismatch
    ├── IdentityError
    ├── ConfigError
    ├── UnknownMessage
    ├── DirectoryError ── PractitionerNotFound, AmbiguousPractitioner, DirectoryUnavailable
    ├── TrustError ── KeyChanged, UntrustedKey, RevokedKey
    ├── TransportError
    │   ├── DeliveryRejected (permanent) ── PatientMailboxForbidden
    │   ├── TransportUnavailable (transient) ── ClockSkew
    │   └── MailFormatError
    └── StorageError

``MailFormatError`` and ``PatientMailboxForbidden`` belong to the mail transport: they are
imported from :mod:`medsecure.mail` (not from the top level); ``ClockSkew`` belongs to the relay
transport and is imported from :mod:`medsecure.transports`.

Authentication failures are opaque: an envelope that was tampered with, truncated, extended or
wrongly signed raises one :class:`EnvelopeError` whose message never says which check failed
(as ``cryptography.exceptions.InvalidTag`` does). Structural parse errors may be specific.

Foreign exceptions (``cbor2``, ``httpx``, ``sqlite3``, ``OSError`` …) are translated at the
boundary with ``raise … from exc``. Programmer mistakes raise ``TypeError`` / ``ValueError``.
"""

from __future__ import annotations

__all__ = [
    "AmbiguousPractitioner",
    "ClockSkew",
    "ConfigError",
    "DeliveryRejected",
    "DirectoryError",
    "DirectoryUnavailable",
    "EnvelopeError",
    "IdentityError",
    "KeyChanged",
    "MailFormatError",
    "MedsecureError",
    "NotARecipient",
    "PatientMailboxForbidden",
    "PractitionerNotFound",
    "RevokedKey",
    "SenderMismatch",
    "StorageError",
    "TransportError",
    "TransportUnavailable",
    "TrustError",
    "UnknownMessage",
    "UntrustedKey",
]


class MedsecureError(Exception):
    """Base class of every error medsecure raises on purpose."""


class EnvelopeError(MedsecureError):
    """An envelope is malformed, tampered with, truncated, extended or wrongly signed."""


class NotARecipient(EnvelopeError):
    """No key of the given identity opens this envelope."""


class SenderMismatch(EnvelopeError):
    """The envelope is authentic but was signed by someone other than ``expected_sender``."""


class IdentityError(MedsecureError):
    """A key file or a public identity cannot be read, decrypted or validated."""


class ConfigError(MedsecureError):
    """A home folder's configuration is missing or invalid."""


class UnknownMessage(MedsecureError, LookupError):
    """No message with this id is known (``Client.status`` of an id the outbox does not hold)."""


class DirectoryError(MedsecureError):
    """A directory could not answer a lookup or a search."""


class PractitionerNotFound(DirectoryError):
    """No practitioner matches the reference."""


class AmbiguousPractitioner(DirectoryError):
    """Several practitioners match a reference that should name exactly one."""


class DirectoryUnavailable(DirectoryError):
    """The directory is unreachable, throttling or failing (transient)."""


class TrustError(MedsecureError):
    """A key could not be bound to a practitioner under the configured trust policy."""


class KeyChanged(TrustError):
    """The key presented differs from the pinned one and no valid rotation explains it."""


class UntrustedKey(TrustError):
    """The key is not vouched for by any accepted authority."""


class RevokedKey(TrustError):
    """The key has been revoked."""


class TransportError(MedsecureError):
    """A transport could not move an envelope."""


class DeliveryRejected(TransportError):
    """The endpoint refused the envelope for good (permanent failure)."""


class TransportUnavailable(TransportError):
    """The endpoint could not be reached now (transient failure; retry later)."""


class ClockSkew(TransportUnavailable):
    """The relay refused a request's signature time: this computer's clock (or the relay's) is
    off by more than the relay's signature window. Nothing is wrong with the message (the outbox
    keeps it queued), but retrying helps only once the clock is set right."""


class MailFormatError(TransportError):
    """A mail message, a MIME structure, a delivery report or an IHE XDM package is malformed
    or exceeds a limit. The message says what is wrong, never what the message contained. The
    mail transport moves such a message to its quarantine folder (never lost)."""


class PatientMailboxForbidden(DeliveryRejected):
    """The message must not go to the patient's mailbox: the patient's recorded opposition, or
    a document marked ``INVISIBLE_PATIENT`` (not visible to the patient)."""


class StorageError(MedsecureError):
    """Local durable storage (outbox, inbox, audit log, files) failed."""
