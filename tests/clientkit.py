"""Building blocks for client tests: an authority, practitioners with drop folders, clients."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import medsecure as m
from medsecure.directory import Directory
from medsecure.models import Endpoint, KeyEntry, Mailbox, Practitioner
from medsecure.transports import FileTransport
from medsecure.trust import AuthorityPolicy, PinStore, sign_binding

NOW = dt.datetime.now(dt.UTC)


@dataclass
class Party:
    name: str
    idnps: str
    identity: m.Identity
    box: Path
    home: Path

    @property
    def ref(self) -> str:
        return f"idnps:{self.idnps}"


def entry(
    authority: m.Identity,
    party: Party,
    *,
    signed: bool = True,
    endpoints: tuple[Endpoint, ...] | None = None,
) -> Practitioner:
    statements: tuple[str, ...] = ()
    if signed:
        st = sign_binding(
            authority,
            idnps=party.idnps,
            key=party.identity.public,
            not_before=NOW - dt.timedelta(days=1),
            not_after=NOW + dt.timedelta(days=365),
            issued_at=NOW - dt.timedelta(days=1),
        )
        statements = (st.to_text(),)
    return Practitioner(
        idnps=party.idnps,
        family_name=party.name.upper(),
        given_name=party.name.capitalize(),
        mailboxes=(Mailbox(address=f"{party.name}@medecin.mssante.fr"),),
        keys=(KeyEntry(public=party.identity.public, statements=statements),),
        endpoints=endpoints
        if endpoints is not None
        else (Endpoint(kind="drop", path=str(party.box)),),
    )


def party(tmp: Path, name: str, idnps: str, identity: m.Identity | None = None) -> Party:
    box = FileTransport.prepare(tmp / f"box-{name}")
    return Party(name, idnps, identity or m.Identity.generate(), box, tmp / f"home-{name}")


def client(p: Party, directory: Directory, authority: m.Identity, **kw: object) -> m.Client:
    return m.Client(
        p.identity,
        directory,
        FileTransport(p.box),
        p.home,
        trust=AuthorityPolicy(
            [authority.public], pins=PinStore(p.box.parent / f"pins-{p.name}.sqlite")
        ),
        me=p.idnps,
        **kw,  # type: ignore[arg-type]
    )
