"""Mail formats of medsecure (sans I/O): the end-to-end profile, the MSSanté profile with its
IHE XDM archive, and delivery reports (DSN, MDN).

Nothing here opens a socket or reads a clock: builders take a ``date`` and return a
:class:`MessageStream` (read it like a file, or iterate :meth:`MessageStream.iter_chunks`);
parsers take a binary stream and raise only :class:`MailFormatError` on malformed input. The
SMTP/IMAP drivers and the mail transport use these; see ``docs/mail.md``.

* :func:`build_e2e_message` — a medsecure envelope as an attachment
  (``application/vnd.medsecure.envelope``, ``<message id>.msec``); neutral subject and text.
* :func:`build_mssante_message` — a standard MSSanté message (TLS only: servers see it all),
  CDA documents in ``IHE_XDM.ZIP``, the ``X-MSS-*`` fields, the ANS subject convention.
* :func:`build_xdm_zip` / :func:`iter_xdm_zip` / :func:`parse_xdm_zip` — IHE XDM packages.
* :func:`build_mdn` — an MDN (RFC 8098, ANS ``processed`` / ``processed/Error: code^label``).
* :func:`parse_message` — any received message: envelope decoded to a file, reports, parts.
* :func:`parse_report` — the :class:`DeliveryReport` values of a DSN or an MDN;
  :func:`fold_status` folds them into a recipient's status.

The network drivers that move those messages are public here too, loaded on first use (so
``import medsecure.mail`` stays sans I/O): :class:`MailServer` (server settings and TLS),
:func:`discover` (RFC 6186 SRV records), :class:`SmtpSubmitter`, :class:`ImapMailbox`,
:class:`MaildirFolder`, the :class:`MailItem` they list, and :func:`classify_header` (is a
listed message medsecure's, a report, or foreign?). See ``docs/mail-transport.md``.
"""

import importlib as _importlib
import typing as _typing

from ._e2e import E2E_SUBJECT, E2E_TEXT, ENVELOPE_MEDIA_TYPE, build_e2e_message
from ._errors import MailFormatError, PatientMailboxForbidden
from ._headers import normalize_message_id
from ._inbound import MailPart, MssanteHeaders, ParsedMessage, parse_message, parse_report
from ._mime import MessageStream
from ._mssante import (
    XDM_FILENAME,
    build_mssante_message,
    display_subject,
    is_patient_mailbox,
    mssante_subject,
)
from ._options import MssanteOptions
from ._parser import MailLimits, PartInfo
from ._reports import DeliveryReport, FoldResult, build_mdn, fold_status
from ._xdm import (
    XdmAuthor,
    XdmDocument,
    XdmEntry,
    XdmLimits,
    XdmPackage,
    XdmSubmission,
    XdmSubmissionSet,
    build_xdm_zip,
    iter_xdm_zip,
    parse_xdm_zip,
)

if _typing.TYPE_CHECKING:
    from ..transports._mailrules import classify_header
    from ._config import DiscoveredServer, MailItem, MailServer, discover
    from ._imap import ImapMailbox
    from ._maildir import MaildirFolder
    from ._smtp import SmtpSubmitter, SubmitResult

__all__ = [
    "E2E_SUBJECT",
    "E2E_TEXT",
    "ENVELOPE_MEDIA_TYPE",
    "XDM_FILENAME",
    "DeliveryReport",
    "DiscoveredServer",
    "FoldResult",
    "ImapMailbox",
    "MailFormatError",
    "MailItem",
    "MailLimits",
    "MailPart",
    "MailServer",
    "MaildirFolder",
    "MessageStream",
    "MssanteHeaders",
    "MssanteOptions",
    "ParsedMessage",
    "PartInfo",
    "PatientMailboxForbidden",
    "SmtpSubmitter",
    "SubmitResult",
    "XdmAuthor",
    "XdmDocument",
    "XdmEntry",
    "XdmLimits",
    "XdmPackage",
    "XdmSubmission",
    "XdmSubmissionSet",
    "build_e2e_message",
    "build_mdn",
    "build_mssante_message",
    "build_xdm_zip",
    "classify_header",
    "discover",
    "display_subject",
    "fold_status",
    "is_patient_mailbox",
    "iter_xdm_zip",
    "mssante_subject",
    "normalize_message_id",
    "parse_message",
    "parse_report",
    "parse_xdm_zip",
]

# The drivers, imported on first use (ssl, smtplib, imaplib; discover needs dnspython).
_LAZY: dict[str, str] = {
    "DiscoveredServer": "medsecure.mail._config",
    "MailItem": "medsecure.mail._config",
    "MailServer": "medsecure.mail._config",
    "discover": "medsecure.mail._config",
    "ImapMailbox": "medsecure.mail._imap",
    "MaildirFolder": "medsecure.mail._maildir",
    "SmtpSubmitter": "medsecure.mail._smtp",
    "SubmitResult": "medsecure.mail._smtp",
    "classify_header": "medsecure.transports._mailrules",
}


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'medsecure.mail' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
