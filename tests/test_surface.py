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
