"""MEDSECURE_HOME: a folder with the identity, configuration, directory cache, outbox and inbox.

``config.json``::

    {"format": "medsecure-home", "version": 1,
     "me": "810000005479",                       # who this client sends as (IDNPS)
     "identity": "identity.key",                 # encrypted; passphrase from MEDSECURE_PASSPHRASE
     "transports": [                             # tried in this order for equal priorities
         {"kind": "drop", "path": "/srv/drop/dr-martin"},   # this client's drop folder
         {"kind": "relay", "url": "https://relay.example"}, # (extra "relay")
         {"kind": "mail", ...}                              # (extra "mail")
     ],
     "directory": [{"file": "directory.json"},   # tried in order and merged (ChainDirectory)
                   {"fhir": "https://…/fhir/v2", "api_key_env": "ESANTE_API_KEY"}],
     "directory_cache_ttl": 86400,
     "trust": {"authorities": ["msp1…"]}          # or {"mode": "unsafe-tofu"}
    }

``"mailbox": "/path"`` (the first releases' form) still means one drop folder. Each transport
section is built by the builder registered for its ``kind`` (:func:`register_transport`), so a
transport of one's own is configured like the shipped ones.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._client import Client, default_home
from ._document import Document
from ._errors import ConfigError, MedsecureError
from ._fs import atomic_write
from ._identity import Identity, PublicIdentity
from ._results import SendResult
from .directory import CachedDirectory, ChainDirectory, Directory, FhirDirectory, FileDirectory
from .identifiers import parse
from .models import Endpoint, KeyEntry, Practitioner
from .transports import FileTransport, Transport
from .trust import AuthorityPolicy, PinStore, TrustPolicy, UnsafeTrustOnFirstUse

__all__ = [
    "ConfigError",
    "client_from_home",
    "default_client",
    "init_home",
    "register_transport",
    "send",
]

PASSPHRASE_ENV = "MEDSECURE_PASSPHRASE"  # noqa: S105 - the variable's name


def _config(home: Path) -> dict[str, Any]:
    path = home / "config.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{str(home)!r} is not a medsecure home (no config.json): run 'medsecure init'"
        ) from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {str(path)!r}: {exc}") from exc
    if (
        not isinstance(doc, dict)
        or doc.get("format") != "medsecure-home"
        or doc.get("version") != 1
    ):
        raise ConfigError(f"{str(path)!r} is not a medsecure home configuration (version 1)")
    return doc


def _resolve(home: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else home / p


def _directory(home: Path, cfg: dict[str, Any]) -> Directory:
    sources = cfg.get("directory") or [{"file": "directory.json"}]
    if isinstance(sources, dict):
        sources = [sources]
    built: list[Directory] = []
    for s in sources:
        if not isinstance(s, dict):
            raise ConfigError("directory entries must be objects")
        if "file" in s:
            built.append(FileDirectory(_resolve(home, s["file"])))
        elif "fhir" in s:
            if not isinstance(s["fhir"], str):
                raise ConfigError("'fhir' is the FHIR base URL (a string)")
            key = os.environ.get(s.get("api_key_env", "ESANTE_API_KEY"))
            fhir = FhirDirectory(s["fhir"], api_key=key)
            built.append(
                CachedDirectory(
                    fhir,
                    path=home / "directory-cache.sqlite",
                    ttl=float(cfg.get("directory_cache_ttl", 86400)),
                )
            )
        else:
            raise ConfigError(f"unknown directory source {sorted(s)}")
    return built[0] if len(built) == 1 else ChainDirectory(built)


TransportBuilder = Callable[[Path, dict[str, Any], Identity], Transport]
_BUILDERS: dict[str, TransportBuilder] = {}


def register_transport(kind: str, builder: TransportBuilder) -> None:
    """Let a home's ``transports`` sections of ``kind`` be built by
    ``builder(home, section, identity)`` (it raises :class:`ConfigError` for a section it cannot
    use)."""
    _BUILDERS[kind] = builder


def _drop(home: Path, section: dict[str, Any], identity: Identity) -> Transport:
    path = section.get("path")
    if not isinstance(path, str) or not path:
        raise ConfigError("a drop transport needs 'path' (its drop folder)")
    return FileTransport(FileTransport.prepare(_resolve(home, path)))


def _relay(home: Path, section: dict[str, Any], identity: Identity) -> Transport:
    url = section.get("url")
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        raise ConfigError("a relay transport needs 'url' (https://…)")
    from .transports import RelayTransport  # httpx and the signing library: only when used

    try:
        return RelayTransport(identity, url, timeout=float(section.get("timeout", 30.0)))
    except ValueError as exc:
        raise ConfigError(f"bad relay section in config.json: {exc}") from exc


register_transport("drop", _drop)
register_transport("relay", _relay)


def _mail(home: Path, section: dict[str, Any], identity: Identity) -> Transport:
    # imported on use: the mail modules are an optional extra (dnspython for DNS discovery)
    from .transports._mail import MailTransport

    return MailTransport.from_config(section, base=home)


register_transport("mail", _mail)


def _transports(home: Path, cfg: dict[str, Any], identity: Identity) -> list[Transport]:
    sections = cfg.get("transports")
    if sections is None and isinstance(cfg.get("mailbox"), str):
        sections = [{"kind": "drop", "path": cfg["mailbox"]}]
    if not isinstance(sections, list) or not sections:
        raise ConfigError("config.json has no 'transports' (e.g. [{'kind': 'drop', 'path': '…'}])")
    built = []
    for section in sections:
        if not isinstance(section, dict) or not isinstance(section.get("kind"), str):
            raise ConfigError("each entry of 'transports' is an object with a 'kind'")
        builder = _BUILDERS.get(section["kind"])
        if builder is None:
            known = ", ".join(sorted(_BUILDERS))
            raise ConfigError(
                f"unknown transport kind {section['kind']!r} in config.json (known: {known};"
                " relay and mail need their extras installed)"
            )
        built.append(builder(home, section, identity))
    return built


def _trust_section(t: Any) -> list[PublicIdentity] | None:
    """Check a trust section: the authorities' keys, or None for the explicit unsafe mode."""
    if not isinstance(t, dict):
        raise ConfigError(
            "no trust policy: give {'authorities': ['msp1…']} or {'mode': 'unsafe-tofu'}"
        )
    if set(t) == {"authorities"}:
        keys = t["authorities"]
        if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
            raise ConfigError("trust 'authorities' must be a non-empty list of public keys (msp1…)")
        try:
            return [PublicIdentity.from_text(k) for k in keys]
        except MedsecureError as exc:
            raise ConfigError(f"bad authority key in the trust section: {exc}") from exc
    if t == {"mode": "unsafe-tofu"}:
        return None
    raise ConfigError("the trust section is {'authorities': [...]} or {'mode': 'unsafe-tofu'}")


def _trust(home: Path, cfg: dict[str, Any]) -> TrustPolicy:
    anchors = _trust_section(cfg.get("trust"))
    pins = PinStore(home / "pins.sqlite")
    return AuthorityPolicy(anchors, pins=pins) if anchors else UnsafeTrustOnFirstUse(pins)


def client_from_home(
    home: str | os.PathLike[str] | None = None, *, passphrase: str | bytes | None = None
) -> Client:
    """Build a :class:`Client` from a home folder's ``config.json``."""
    root = Path(home).expanduser() if home is not None else default_home()
    cfg = _config(root)
    secret = passphrase if passphrase is not None else os.environ.get(PASSPHRASE_ENV)
    if not secret:
        raise ConfigError(f"the identity is encrypted: set {PASSPHRASE_ENV}")
    identity = Identity.load(_resolve(root, cfg.get("identity", "identity.key")), passphrase=secret)
    transports = _transports(root, cfg, identity)
    # the MSSanté profile's settings come from the first mail section that has a product
    # reference (its fallback switch included)
    mssante, fallback = None, False
    for t in transports:
        if getattr(t, "product_reference", None) and hasattr(t, "mssante_options"):
            mssante, fallback = t.mssante_options(), bool(getattr(t, "mssante_fallback", False))
            break
    return Client(
        identity,
        _directory(root, cfg),
        transports,
        root,
        trust=_trust(root, cfg),
        me=cfg.get("me"),
        mssante=mssante,
        mssante_fallback=fallback,
    )


def init_home(
    home: str | os.PathLike[str],
    *,
    passphrase: str | bytes,
    me: str,
    mailbox: str | os.PathLike[str] | None = None,
    suite: str = "hybrid",
    trust: dict[str, Any],
    directory: Sequence[dict[str, Any]] | None = None,
    family_name: str | None = None,
    given_name: str | None = None,
    transports: Sequence[dict[str, Any]] = (),
    endpoints: Sequence[Endpoint] = (),
    relay: str | None = None,
) -> Identity:
    """Create a home: identity (encrypted), config.json, a drop mailbox, and a local directory
    file holding this practitioner's own entry (key and endpoints) to share with peers.

    ``trust`` is required: ``{"authorities": ["msp1…"]}`` (keys vouched for by these
    authorities) or the explicit ``{"mode": "unsafe-tofu"}``. ``relay`` (a relay's URL) adds a
    relay transport and one's mailbox on it (named by the identity's fingerprint) to the entry;
    ``transports`` adds other configuration sections after the drop folder's, ``endpoints`` the
    matching entries of one's own directory entry. If anything fails, what was created is
    removed again: a failed init leaves no half-made home."""
    root = Path(home).expanduser()
    if (root / "config.json").exists():
        raise ConfigError(f"{str(root)!r} is already a medsecure home")
    idnps = parse(me).idnps  # before anything is created
    _trust_section(trust)  # what decides trust is the caller's explicit choice
    if relay is not None:
        from .transports._relay import check_relay_url

        try:
            check_relay_url(relay)
        except ValueError as exc:
            raise ConfigError(f"relay: {exc}") from None
    for section in transports:
        if not isinstance(section, dict) or section.get("kind") not in _BUILDERS:
            raise ConfigError(f"unknown transport section {section!r}")
    created_root = not root.exists()
    made: list[Path] = []
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        identity = Identity.generate(suite)
        first_sections: list[dict[str, Any]] = []
        first_endpoints: list[Endpoint] = []
        if relay is not None:  # a relay first: online, end to end, and it keeps what waits
            first_sections.append({"kind": "relay", "url": relay})
            first_endpoints.append(Endpoint(kind="relay", url=relay, mailbox=identity.fingerprint))
        made.append(root / "identity.key")
        identity.save(root / "identity.key", passphrase=passphrase)
        box_path = Path(mailbox).expanduser() if mailbox is not None else root / "mailbox"
        if not box_path.exists():
            made.append(box_path)
        box = FileTransport.prepare(box_path)
        own = Practitioner(
            idnps=idnps,
            family_name=family_name,
            given_name=given_name,
            keys=(KeyEntry(public=identity.public),),
            endpoints=(
                *first_endpoints,
                # with a relay or mail address, the drop folder (usually reachable on this
                # machine only) is the last way others try: a missing one would otherwise hold
                # their messages back as "retry later"
                Endpoint(
                    kind="drop",
                    path=str(box.resolve()),
                    priority=1 if first_endpoints or endpoints else 0,
                ),
                *endpoints,
            ),
        )
        made.append(root / "directory.json")
        FileDirectory(root / "directory.json").add(own)
        cfg = {
            "format": "medsecure-home",
            "version": 1,
            "me": idnps,
            "identity": "identity.key",
            "transports": [
                *first_sections,
                {"kind": "drop", "path": str(box.resolve())},
                *transports,
            ],
            "directory": list(directory) if directory is not None else [{"file": "directory.json"}],
            "trust": trust,
        }
        # validate what was written as the client will read it (a bad section fails here)
        _transports(root, cfg, identity)
        made.append(root / "config.json")
        atomic_write(root / "config.json", (json.dumps(cfg, indent=2) + "\n").encode(), mode=0o600)
    except BaseException:
        if created_root:
            shutil.rmtree(root, ignore_errors=True)
        else:
            for path in reversed(made):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        raise
    return identity


_default: dict[Path, Client] = {}
_default_lock = threading.Lock()


def default_client() -> Client:
    """The client configured from ``MEDSECURE_HOME`` (created once per home)."""
    home = default_home()
    with _default_lock:
        client = _default.get(home)
        if client is None:
            client = client_from_home(home)
            _default[home] = client
            atexit.register(client.close)  # final audit checkpoint when the program ends
        return client


def send(
    document: Document | Sequence[Document],
    to: str | Practitioner | Sequence[str | Practitioner],
    *,
    subject: str | None = None,
    body: str | None = None,
    **kwargs: Any,
) -> SendResult:
    """Send with the default client (configured from ``MEDSECURE_HOME``), like ``httpx.get``."""
    return default_client().send(document, to, subject=subject, body=body, **kwargs)
