"""The public surface: what ``import medsecure`` offers, pinned literally."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

import medsecure

TOP_LEVEL = [
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


def test_top_level_names_are_pinned() -> None:
    assert medsecure.__all__ == TOP_LEVEL
    assert len(TOP_LEVEL) <= 40
    for name in TOP_LEVEL:
        assert getattr(medsecure, name) is not None
    # nothing public at the top level that is not listed (subpackages aside)
    extra = {
        n
        for n in dir(medsecure)
        if not n.startswith("_") and not isinstance(getattr(medsecure, n), types.ModuleType)
    } - set(TOP_LEVEL)
    assert not extra


def test_error_tree() -> None:
    errors = [n for n in TOP_LEVEL if n[0].isupper() and isinstance(getattr(medsecure, n), type)]
    for name in errors:
        cls = getattr(medsecure, name)
        if issubclass(cls, Exception):
            assert issubclass(cls, medsecure.MedsecureError), name
    assert issubclass(medsecure.ConfigError, medsecure.MedsecureError)
    assert issubclass(medsecure.UnknownMessage, LookupError)


def test_moved_names_still_work_with_a_warning() -> None:
    from medsecure.trust import AuthorityPolicy

    with pytest.warns(DeprecationWarning, match=r"medsecure\.trust\.AuthorityPolicy"):
        assert medsecure.AuthorityPolicy is AuthorityPolicy  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        medsecure.NoSuchThing  # type: ignore[attr-defined]  # noqa: B018


def test_subpackages_are_reachable_as_attributes() -> None:
    assert medsecure.trust.AuthorityPolicy is not None  # type: ignore[attr-defined]
    assert medsecure.client.Client is medsecure.Client  # type: ignore[attr-defined]


def test_import_loads_only_the_errors() -> None:
    """``import medsecure`` is cheap: the envelope, the models, httpx and the client load when
    first used (docs/performance.md has the timing)."""
    code = (
        "import sys, medsecure;"
        "heavy = [m for m in ('pydantic', 'httpx', 'cryptography', 'medsecure._client',"
        " 'medsecure.models', 'medsecure.envelope._seal') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_mail_formats_load_no_network_driver() -> None:
    """``medsecure.mail``'s message formats are sans I/O: its drivers (SMTP, IMAP, Maildir) are
    public names of the same package but load on first use."""
    code = (
        "import sys, medsecure.mail as mail;"
        "early = [m for m in ('smtplib', 'imaplib', 'medsecure.mail._smtp', 'medsecure.mail._imap')"
        " if m in sys.modules];"
        "mail.SmtpSubmitter, mail.ImapMailbox;"
        "late = [m for m in ('medsecure.mail._smtp', 'medsecure.mail._imap') if m in sys.modules];"
        "print(','.join(early) + '|' + ','.join(late))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "|medsecure.mail._smtp,medsecure.mail._imap"


# Every public subpackage's names, pinned literally: a name that moves or disappears is a change
# users notice (CHANGELOG), never an accident.
SUBPACKAGES = {
    "medsecure.audit": ["Anchor", "AuditLog", "FileAnchor", "VerifyReport", "export", "verify"],
    "medsecure.client": [
        "Client",
        "OutboxEntry",
        "QuarantinedEnvelope",
        "ReceivedDocument",
        "ReceivedMessage",
        "RecipientStatus",
        "SendResult",
        "StatusEvent",
        "default_home",
    ],
    "medsecure.directory": [
        "CachedDirectory",
        "ChainDirectory",
        "Directory",
        "FhirDirectory",
        "FileDirectory",
        "MemoryDirectory",
        "Ref",
        "merge_practitioners",
        "normalize_ref",
        "practitioners_from_bundle",
    ],
    "medsecure.envelope": ["Unsealed", "seal", "seal_stream", "unseal", "unseal_stream"],
    "medsecure.identifiers": [
        "IDNPS_SYSTEM",
        "IDNST_SYSTEM",
        "INS",
        "INS_DEMO_NIR",
        "INS_NIA",
        "INS_NIR",
        "INS_TEST_NIR",
        "RPPS_SYSTEM",
        "Identifier",
        "MSSanteAddress",
        "luhn_ok",
        "parse",
        "parse_address",
    ],
    "medsecure.mail": [
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
    ],
    "medsecure.models": [
        "Code",
        "Endpoint",
        "KeyEntry",
        "Mailbox",
        "Organization",
        "OrganizationRef",
        "Patient",
        "Practitioner",
    ],
    "medsecure.relay": [
        "PROBLEMS",
        "SIGNATURE_TAG",
        "KeyBundle",
        "Problem",
        "VerifiedRequest",
        "openapi_document",
        "problem_type",
        "sign_bundle",
        "sign_request",
        "verify_request",
    ],
    "medsecure.transports": [
        "AsyncMockTransport",
        "AsyncRelayTransport",
        "AsyncTransport",
        "ClockSkew",
        "Delivery",
        "DeliveryReport",
        "FileTransport",
        "Incoming",
        "MailTransport",
        "MockTransport",
        "RelayTransport",
        "Transport",
        "UnsupportedItem",
        "UploadState",
    ],
    "medsecure.trust": [
        "AuthorityPolicy",
        "PinStore",
        "Statement",
        "TrustDecision",
        "TrustPolicy",
        "UnsafeAcceptAll",
        "UnsafeTrustOnFirstUse",
        "sign_binding",
        "sign_revocation",
        "sign_rotation",
    ],
}


@pytest.mark.parametrize("module", sorted(SUBPACKAGES))
def test_subpackage_names_are_pinned(module: str) -> None:
    import importlib

    mod = importlib.import_module(module)
    assert list(mod.__all__) == SUBPACKAGES[module]
    for name in mod.__all__:
        assert getattr(mod, name) is not None, name
