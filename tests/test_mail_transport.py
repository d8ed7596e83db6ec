"""MailTransport against real servers on loopback: aiosmtpd (STARTTLS, AUTH, DSN advertised, a
test CA) delivering into dovecot (IMAP), and dovecot's Maildir; then medsecure clients talking
through them end to end.

Locally these tests skip, saying why, when dovecot cannot be started; with ``CI`` set they fail.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
import re
import stat
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from clientkit import NOW
from mailkit import CDA, PDF, SAMPLES, SUBMISSION, cda_document, pdf_document
from mailservers import (
    HOST,
    Dovecot,
    Pki,
    Received,
    SmtpServer,
    empty_mailboxes,
    imap_admin,
    imap_append,
    make_pki,
    start_dovecot,
)

import medsecure as m
from medsecure.directory import MemoryDirectory
from medsecure.mail import (
    MailFormatError,
    PatientMailboxForbidden,
    XdmDocument,
    build_mdn,
    build_mssante_message,
    parse_message,
    parse_xdm_zip,
)
from medsecure.mail._config import MailServer
from medsecure.mail._imap import imap_utf7
from medsecure.mail._smtp import SmtpSubmitter
from medsecure.models import Endpoint, KeyEntry, Mailbox, Practitioner
from medsecure.transports import Incoming, MailTransport, UnsupportedItem
from medsecure.trust import AuthorityPolicy, PinStore, sign_binding

DOMAIN = "medecin.mssante.fr"
# dovecot users (and SMTP logins) of the tests: a mailbox each
USERS = {"carol": "carol pass 1", "dave": "dave pass 1", "erin": "erin pass 1"}
ULID = "01HXR4T3M5K8Q9V2W6Y7Z0ABCD"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def dovecot(pki: Pki) -> Iterator[Dovecot]:
    server = start_dovecot(pki, users=USERS)
    yield server
    server.stop()


@pytest.fixture
def fresh(dovecot: Dovecot) -> Dovecot:
    empty_mailboxes(dovecot)
    return dovecot


@pytest.fixture
def smtp(pki: Pki, fresh: Dovecot) -> Iterator[SmtpServer]:
    """aiosmtpd that delivers what it accepts into the recipients' dovecot mailboxes (as an
    operator's MTA would), DSN advertised."""

    def deliver(received: Received) -> None:
        for rcpt in received.rcpt_tos:
            user = rcpt.split("@", 1)[0]
            if user in fresh.passwords:
                imap_append(fresh, received.content, user=user)

    with SmtpServer(pki, users=dict(USERS), dsn=True) as server:
        server.state.deliver = deliver
        yield server


def addr(user: str) -> str:
    return f"{user}@{DOMAIN}"


def smtp_settings(pki: Pki, server: SmtpServer, user: str) -> MailServer:
    return MailServer(
        host=HOST,
        port=server.port,
        username=user,
        password=lambda: USERS[user],
        ca_file=str(pki.ca),
        timeout=60.0,
    )


def imap_settings(server: Dovecot, user: str) -> MailServer:
    return MailServer(
        host=HOST,
        port=server.ssl_port,
        security="tls",
        username=user,
        password=lambda: server.passwords[user],
        ca_file=str(server.pki.ca),
        timeout=60.0,
    )


def mail_transport(
    pki: Pki, smtp: SmtpServer, dovecot: Dovecot, user: str, **kwargs: object
) -> MailTransport:
    opts: dict[str, object] = {
        "smtp": smtp_settings(pki, smtp, user),
        "imap": imap_settings(dovecot, user),
        "product_reference": "NIL-TEST-0001",
    }
    opts.update(kwargs)
    return MailTransport(addr(user), **opts)  # type: ignore[arg-type]


def folder(dovecot: Dovecot, user: str, name: str = "INBOX") -> list[tuple[set[str], bytes]]:
    """(flags, bytes) of every message of a folder (empty if the folder does not exist)."""
    with imap_admin(dovecot, user) as imap:
        typ, _ = imap.select(f'"{imap_utf7(name)}"', readonly=True)
        if typ != "OK":
            imap.logout()
            return []
        _, data = imap.uid("FETCH", "1:*", "(FLAGS BODY.PEEK[])")
        imap.logout()
    out = []
    for d in data:
        if isinstance(d, tuple):
            flags = re.search(rb"FLAGS \(([^)]*)\)", d[0])
            names = set(flags.group(1).decode().split()) if flags else set()
            out.append((names - {"\\Recent"}, d[1]))
    return out


def plain(subject: str = "Rendez-vous", **headers: str) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (
        f"From: <someone@{DOMAIN}>\r\nTo: <carol@{DOMAIN}>\r\nSubject: {subject}\r\n"
        f"Message-ID: <human-1@{DOMAIN}>\r\n{extra}MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\nA bientot.\r\n"
    ).encode()


# -- deliver, list, take, acknowledge ---------------------------------------------------------


def test_deliver_list_take_acknowledge(
    pki: Pki, smtp: SmtpServer, fresh: Dovecot, tmp_path: Path
) -> None:
    envelope = b"MEDSEC\x00\x01" + os.urandom(100_000)
    with (
        mail_transport(pki, smtp, fresh, "dave") as sender,
        mail_transport(pki, smtp, fresh, "carol") as receiver,
    ):
        for _ in range(2):  # a retry carries the same Message-ID
            sender.deliver(
                Endpoint(kind="mail", address=addr("carol")),
                io.BytesIO(envelope),
                message_id=ULID,
                size=len(envelope),
            )
        other = "01HXR4T3M5K8Q9V2W6Y7Z0ABCE"
        sender.deliver(
            Endpoint(kind="mail", address=addr("carol")),
            io.BytesIO(envelope),
            message_id=other,
            size=len(envelope),
        )
        assert smtp.state.connections == 1  # one connection for the three deliveries
        sent = smtp.state.messages
        assert len(sent) == 3
        assert sent[0].mail_from == addr("dave") and sent[0].rcpt_tos == [addr("carol")]
        assert f"ENVID={ULID}" in sent[0].mail_options and "RET=HDRS" in sent[0].mail_options
        assert "NOTIFY=SUCCESS,FAILURE" in sent[0].rcpt_options[0]
        ids = [re.search(rb"Message-ID: <([^>]+)>", s.content).group(1) for s in sent]  # type: ignore[union-attr]
        assert ids == [f"{ULID}@{DOMAIN}".encode()] * 2 + [f"{other}@{DOMAIN}".encode()]
        assert b"X-MSS-NIL: NIL-TEST-0001" in sent[0].content

        items = receiver.list()
        assert [(i.kind, i.message_id) for i in items] == [
            ("envelope", ULID),
            ("envelope", ULID),
            ("envelope", other),
        ]
        target = tmp_path / "in.msec"
        receiver.take(items[0], target)
        assert target.read_bytes() == envelope
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
        with receiver.fetch(items[2]) as f:
            assert f.read() == envelope
        # listing and taking marked nothing read
        assert all("\\Seen" not in flags for flags, _ in folder(fresh, "carol"))
        for item in items:
            receiver.acknowledge(item)
        assert receiver.list() == []
    assert folder(fresh, "carol") == []
    assert len(folder(fresh, "carol", "medsecure-processed")) == 3


def test_foreign_messages_are_left_untouched(
    pki: Pki, smtp: SmtpServer, fresh: Dovecot, tmp_path: Path
) -> None:
    reply = plain("Re: Message sécurisé / Secure message".encode("ascii", "replace").decode())
    someone_elses_dsn = (SAMPLES / "postfix_dsn_failed.eml").read_bytes()
    someone_elses_dsn = someone_elses_dsn.replace(b"01HXR4T3M5K8Q9V2W6Y7Z0ABCD", b"abc-123")
    foreign = [plain(), reply, someone_elses_dsn, b"not even a header\r\n\r\nbody\r\n"]
    for data in foreign:
        imap_append(fresh, data, user="carol")
    before = folder(fresh, "carol")
    with mail_transport(pki, smtp, fresh, "carol") as receiver:
        assert receiver.list() == []
        assert receiver.list() == []  # remembered: not peeked again, still not listed
    assert folder(fresh, "carol") == before  # same bytes, same flags (nothing read)


def test_malformed_message_is_quarantined_and_the_others_received(
    pki: Pki, smtp: SmtpServer, fresh: Dovecot, tmp_path: Path
) -> None:
    envelope = b"MEDSEC\x00\x01" + b"\x00" * 5000
    with mail_transport(pki, smtp, fresh, "dave") as sender:
        for mid in (ULID, "01HXR4T3M5K8Q9V2W6Y7Z0ABCF"):
            sender.deliver(
                Endpoint(kind="mail", address=addr("carol")),
                io.BytesIO(envelope),
                message_id=mid,
                size=len(envelope),
            )
    good = smtp.state.messages[0].content
    # the same message, broken: invalid base64 in the envelope part, and no close delimiter
    broken = good.replace(b"AAAA", b"A!A!", 1)
    truncated = good[: good.rindex(b"--=_ms_")]
    imap_append(fresh, broken, user="carol")
    imap_append(fresh, truncated, user="carol")
    with mail_transport(pki, smtp, fresh, "carol") as receiver:
        items = receiver.list()
        assert len(items) == 4
        taken, refused = [], []
        for n, item in enumerate(items):
            try:
                receiver.take(item, tmp_path / f"{n}.msec")
            except UnsupportedItem as exc:
                refused.append(str(exc))
                assert not (tmp_path / f"{n}.msec").exists()
                continue
            taken.append((tmp_path / f"{n}.msec").read_bytes())
            receiver.acknowledge(item)
        assert taken == [envelope, envelope]
        assert len(refused) == 2 and all("quarantine" in r for r in refused)
        assert receiver.list() == []
    quarantined = sorted(data for _, data in folder(fresh, "carol", "medsecure-quarantine"))
    assert quarantined == sorted([broken, truncated])  # kept whole, never lost
    assert folder(fresh, "carol") == []


def test_mssante_endpoint_takes_the_message_as_it_is(
    pki: Pki, smtp: SmtpServer, fresh: Dovecot, tmp_path: Path
) -> None:
    """A ready-made MSSanté message (IHE_XDM.ZIP + PDF) is submitted unchanged; the reader
    gets the XDM archive; its MDN comes back to the sender's transport as a report."""
    cda = XdmDocument(
        cda_document(),
        class_code=m.models.Code(code="11", label="CR", system="1.2.250.1.213.1.1.4.1"),
    )
    outbox_file = tmp_path / f"{ULID}.eml"
    stream = build_mssante_message(
        sender=addr("dave"),
        recipients=[addr("erin")],
        body="Bonjour, voici le compte rendu.",
        date=NOW,
        message_id=f"{ULID}@{DOMAIN}",
        product_reference="NIL-TEST-0001",
        documents=[cda, pdf_document()],
        submission=SUBMISSION,
        read_receipt=True,
    )
    outbox_file.write_bytes(b"".join(stream.iter_chunks()))
    with mail_transport(pki, smtp, fresh, "dave") as sender:
        with outbox_file.open("rb") as fh:
            sender.deliver(
                Endpoint(kind="mssante", address=addr("erin")),
                fh,
                message_id=ULID,
                size=outbox_file.stat().st_size,
            )
        assert smtp.state.messages[-1].content == outbox_file.read_bytes().replace(
            b"\r\n", b"\n"
        ).replace(b"\n", b"\r\n")
        assert f"ENVID={ULID}" in smtp.state.messages[-1].mail_options
        # an envelope routed to an mssante endpoint is refused, never sent as noise
        with pytest.raises(m.DeliveryRejected, match="not an envelope"):
            sender.deliver(
                Endpoint(kind="mssante", address=addr("erin")),
                io.BytesIO(b"MEDSEC\x00\x01rest"),
                message_id=ULID,
                size=12,
            )

        # erin (no medsecure) reads it with a mail client and answers with an MDN
        [(_, raw)] = folder(fresh, "erin")
        archives: dict[str, io.BytesIO] = {}
        parsed = parse_message(
            io.BytesIO(raw),
            attachment_sink=lambda info: archives.setdefault(info.filename or "?", io.BytesIO()),
        )
        assert parsed.kind == "mail" and parsed.disposition_notification_to == addr("dave")
        assert {"IHE_XDM.ZIP", "Compte rendu échographie.pdf"} <= set(archives)
        with zipfile.ZipFile(archives["IHE_XDM.ZIP"]) as z:
            assert "IHE_XDM/SUBSET01/METADATA.XML" in z.namelist()
        archives["IHE_XDM.ZIP"].seek(0)
        assert len(parse_xdm_zip(archives["IHE_XDM.ZIP"]).entries) == 1
        mdn = build_mdn(
            sender=addr("erin"),
            to=addr("dave"),
            original_message_id=parsed.message_id or "",
            final_recipient=addr("erin"),
            date=NOW,
            message_id=f"mdn-1@{DOMAIN}",
            product_reference="NIL-OTHER",
        )
        with SmtpSubmitter(smtp_settings(pki, smtp, "erin")) as erin:
            erin.submit(mdn, sender=addr("erin"), recipients=[addr("dave")])  # type: ignore[arg-type]
        [item] = sender.list()
        assert item.kind == "report" and item.report is not None
        assert item.report.message_id == ULID
        assert (item.report.status, item.report.source) == ("delivered", "mdn")
        assert item.report.recipient == addr("erin")
        sender.acknowledge(item)
        assert sender.list() == []
    assert len(folder(fresh, "dave", "medsecure-processed")) == 1


def test_maildir_source(pki: Pki, smtp: SmtpServer, fresh: Dovecot, tmp_path: Path) -> None:
    envelope = os.urandom(3000)
    with mail_transport(pki, smtp, fresh, "dave") as sender:
        sender.deliver(
            Endpoint(kind="mail", address=addr("carol")),
            io.BytesIO(envelope),
            message_id=ULID,
            size=len(envelope),
        )
    imap_append(fresh, plain(), user="carol")
    with imap_admin(fresh, "carol") as imap:  # the server's own folder, owned by the mail user
        imap.create('"medsecure-processed"')
        imap.logout()
    box = MailTransport(addr("carol"), maildir=fresh.maildir_of("carol"))
    [item] = box.list()  # the person's mail is not listed
    box.take(item, tmp_path / "x.msec")
    assert (tmp_path / "x.msec").read_bytes() == envelope
    box.acknowledge(item)
    assert box.list() == []
    assert len(folder(fresh, "carol", "medsecure-processed")) == 1
    assert len(folder(fresh, "carol")) == 1  # the person's mail stays where it was


# -- clients end to end -----------------------------------------------------------------------


@dataclass
class Party:
    user: str
    idnps: str
    identity: m.Identity
    home: Path

    @property
    def address(self) -> str:
        return addr(self.user)


def practitioner(authority: m.Identity, p: Party) -> Practitioner:
    statement = sign_binding(
        authority,
        idnps=p.idnps,
        key=p.identity.public,
        not_before=NOW - dt.timedelta(days=1),
        not_after=NOW + dt.timedelta(days=365),
        issued_at=NOW - dt.timedelta(days=1),
    )
    return Practitioner(
        idnps=p.idnps,
        family_name=p.user.upper(),
        mailboxes=(Mailbox(address=p.address),),
        keys=(KeyEntry(public=p.identity.public, statements=(statement.to_text(),)),),
        endpoints=(Endpoint(kind="mail", address=p.address),),
    )


@pytest.fixture
def world(
    pki: Pki, smtp: SmtpServer, fresh: Dovecot, tmp_path: Path
) -> Iterator[tuple[m.Client, m.Client, Party, Party, MemoryDirectory]]:
    authority = m.Identity.generate()
    dave = Party("dave", "810000005479", m.Identity.generate(), tmp_path / "home-dave")
    carol = Party("carol", "810000000017", m.Identity.generate(), tmp_path / "home-carol")
    # erin has an MSSanté mailbox and no medsecure key
    erin = Practitioner(
        idnps="810000000025",
        family_name="ERIN",
        mailboxes=(Mailbox(address=addr("erin"), type="PER"),),
    )
    directory = MemoryDirectory(
        [practitioner(authority, dave), practitioner(authority, carol), erin]
    )

    def client(p: Party) -> m.Client:
        transport = mail_transport(pki, smtp, fresh, p.user)
        return m.Client(
            p.identity,
            directory,
            transport,
            p.home,
            trust=AuthorityPolicy([authority.public], pins=PinStore(tmp_path / f"{p.user}.pins")),
            me=p.idnps,
            mssante=transport.mssante_options(submission=SUBMISSION),
        )

    with client(dave) as a, client(carol) as b:
        yield a, b, dave, carol, directory
        for c in (a, b):
            for t in c.transports:
                t.close()


def test_two_practitioners_exchange_a_message_and_its_signed_receipts(
    world: tuple[m.Client, m.Client, Party, Party, MemoryDirectory],
    smtp: SmtpServer,
    fresh: Dovecot,
) -> None:
    a, b, dave, carol, _ = world
    doc = cda_document()
    result = a.send(doc, to=f"idnps:{carol.idnps}", receipts=("delivered", "read"))
    assert [r.status for r in result.recipients] == ["sent"]
    # what the servers saw names neither the patient nor the document
    wire = smtp.state.messages[-1].content
    for secret in (b"DUPONT", b"279035121518989", b"cr-consultation", b"Compte rendu"):
        assert secret not in wire

    [msg] = b.receive()
    assert msg.sender.idnps == dave.idnps
    assert msg.documents[0].read() == CDA
    msg.mark_read()  # the read receipt goes out now (the delivered one went at receive)
    msg.ack()
    assert b.receive() == []
    assert folder(fresh, "carol") == []

    assert a.receive() == []  # the two signed receipts, folded
    [status] = a.status(result.message_id)
    assert status.status == "read"
    assert set(status.receipts) == {"delivered", "read"}
    assert folder(fresh, "dave") == []
    assert len(folder(fresh, "dave", "medsecure-processed")) == 2


def test_a_practitioner_without_a_key_gets_an_xdm_message_and_answers_with_mdns(
    world: tuple[m.Client, m.Client, Party, Party, MemoryDirectory],
    smtp: SmtpServer,
    fresh: Dovecot,
    pki: Pki,
) -> None:
    a, _, dave, _, _ = world
    cda = XdmDocument(
        cda_document(),
        class_code=m.models.Code(code="11", label="CR", system="1.2.250.1.213.1.1.4.1"),
    )
    result = a.send(
        [cda, pdf_document()], to="idnps:810000000025", receipts=("read",), mssante_fallback=True
    )
    [status] = result.recipients
    assert (status.status, status.endpoint) == ("sent", "mssante")
    assert f"ENVID={result.message_id}" in smtp.state.messages[-1].mail_options

    # erin reads it in an ordinary mail client: the documents and the IHE_XDM.ZIP are there
    [(_, raw)] = folder(fresh, "erin")
    sink: dict[str, io.BytesIO] = {}
    parsed = parse_message(
        io.BytesIO(raw),
        attachment_sink=lambda info: sink.setdefault(info.filename or "?", io.BytesIO()),
    )
    assert parsed.message_id == f"{result.message_id}@{DOMAIN}"
    assert parsed.disposition_notification_to == dave.address
    assert parsed.mssante.nil == "NIL-TEST-0001" and parsed.mssante.codecda == ("11488-4",)
    sink["IHE_XDM.ZIP"].seek(0)
    package = parse_xdm_zip(sink["IHE_XDM.ZIP"])
    assert len(package.entries) == 1
    assert sink["Compte rendu échographie.pdf"].getvalue() == PDF

    # her software answers "processed", then she opens it: "displayed"
    with SmtpSubmitter(smtp_settings(pki, smtp, "erin")) as erin:
        for n, disposition in enumerate(("processed", "displayed")):
            mdn = build_mdn(
                sender=addr("erin"),
                to=dave.address,
                original_message_id=parsed.message_id or "",
                final_recipient=addr("erin"),
                date=NOW,
                message_id=f"mdn-{n}@{DOMAIN}",
                disposition=disposition,  # type: ignore[arg-type]
                automatic=disposition == "processed",
                product_reference="NIL-OTHER",
            )
            erin.submit(mdn, sender=addr("erin"), recipients=[dave.address])  # type: ignore[arg-type]
            a.receive()
            [status] = a.status(result.message_id)
            assert status.status == ("delivered" if disposition == "processed" else "read")
    assert status.receipts == ("delivered", "read")
    assert folder(fresh, "dave") == []

    # an MDN with the ANS error form fails a later message, with the reason
    second = a.send([cda], to="idnps:810000000025", mssante_fallback=True)
    error = (SAMPLES / "mssante_mdn_error.eml").read_bytes()
    error = error.replace(
        b"199509192301.23456 @chb.mssante.fr", f"{second.message_id}@{DOMAIN}".encode()
    )
    error = error.replace(b"serviceY_auto@chb.mssante.fr", addr("erin").encode())
    imap_append(fresh, error, user="dave")
    a.receive()
    [status] = a.status(second.message_id)
    assert status.status == "failed"
    assert status.error == "mdn: 902 Identifiant de patient inconnu"


def _report(sample: str, **swap: str) -> bytes:
    data = (SAMPLES / sample).read_bytes()
    for old, new in swap.items():
        data = data.replace(old.encode(), new.encode())
    return data


def test_operator_reports_fold_into_the_senders_status(
    world: tuple[m.Client, m.Client, Party, Party, MemoryDirectory],
    fresh: Dovecot,
    smtp: SmtpServer,
) -> None:
    a, _, dave, carol, _ = world
    first = a.send(cda_document(), to=f"idnps:{carol.idnps}")
    second = a.send(cda_document(), to=f"idnps:{carol.idnps}")
    third = a.send(cda_document(), to=f"idnps:{carol.idnps}")
    # a Postfix DSN (failed, by ENVID), an Exchange NDR (failed, by the returned headers),
    # an RFC 8098 MDN (displayed), a delayed DSN (changes nothing), as operators send them
    imap_append(
        fresh,
        _report(
            "postfix_dsn_failed.eml",
            **{
                "01HXR4T3M5K8Q9V2W6Y7Z0ABCD": first.message_id,
                "inconnu@hopital-exemple.mssante.fr": carol.address,
                "dr.martin@medecin.mssante.fr": dave.address,
            },
        ),
        user="dave",
    )
    imap_append(
        fresh,
        _report(
            "rfc8098_mdn_displayed.eml",
            **{
                "199509192301.23456@example.org": f"{second.message_id}@{DOMAIN}",
                "Joe_Recipient@example.com": carol.address,
            },
        ),
        user="dave",
    )
    imap_append(
        fresh,
        _report(
            "postfix_dsn_delayed.eml",
            **{
                "01HXR4A0B1C2D3E4F5G6H7J8K9": third.message_id,
                "dr.durand@clinique-exemple.mssante.fr": carol.address,
            },
        ),
        user="dave",
    )
    a.receive()
    [s1] = a.status(first.message_id)
    assert s1.status == "failed"
    assert s1.error is not None and "5.1.1" in s1.error and "dsn" in s1.error
    assert carol.address not in s1.error  # addresses masked (a patient mailbox names an INS)
    [s2] = a.status(second.message_id)
    assert s2.status == "read" and s2.receipts == ("read",)
    [s3] = a.status(third.message_id)
    assert s3.status == "sent"
    assert folder(fresh, "dave") == []  # all three handed over and moved
    assert len(folder(fresh, "dave", "medsecure-processed")) == 3
    # the same report again (a duplicate) contradicts nothing
    imap_append(
        fresh,
        _report(
            "rfc8098_mdn_displayed.eml",
            **{
                "199509192301.23456@example.org": f"{first.message_id}@{DOMAIN}",
                "Joe_Recipient@example.com": carol.address,
            },
        ),
        user="dave",
    )
    a.receive()
    [s1] = a.status(first.message_id)
    assert s1.status == "failed" and s1.late_receipts == ("read",)


def test_transient_replies_are_retried_and_550_fails_with_the_text(
    world: tuple[m.Client, m.Client, Party, Party, MemoryDirectory],
    smtp: SmtpServer,
    fresh: Dovecot,
) -> None:
    a, b, _, carol, _ = world
    # mid-transaction: after the data, at the recipient, and the server closing the session
    for script in (
        {"DATA": ["451 4.3.0 Try again later"]},
        {"RCPT": ["451 4.3.0 Try again later"]},
        {"DATA": ["421 4.7.0 Too busy, closing"]},
    ):
        smtp.state.script = script
        result = a.send(cda_document(), to=f"idnps:{carol.idnps}")
        [status] = result.recipients
        assert status.status == "queued" and status.error is not None
        assert ("451 4.3.0" in status.error) or ("421 4.7.0" in status.error)
        assert b.receive() == []  # nothing arrived, nothing lost
        a.flush(force=True)  # "later": the outbox retries
        [status] = a.status(result.message_id)
        assert status.status == "sent"
        [msg] = b.receive()
        msg.ack()

    smtp.state.script = {"RCPT": [f"550 5.1.1 <{carol.address}>: mailbox unknown"]}
    result = a.send(cda_document(), to=f"idnps:{carol.idnps}")
    [status] = result.recipients
    assert status.status == "failed"
    assert status.error is not None and "550 5.1.1" in status.error
    assert "mailbox unknown" in status.error and carol.address not in status.error


def test_malformed_mail_through_the_client(
    world: tuple[m.Client, m.Client, Party, Party, MemoryDirectory],
    smtp: SmtpServer,
    fresh: Dovecot,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b, _, carol, _ = world
    a.send(cda_document(), to=f"idnps:{carol.idnps}")
    good = smtp.state.messages[-1].content
    broken = good[: len(good) // 2]  # cut in the middle of the envelope part
    imap_append(fresh, broken, user="carol")
    imap_append(fresh, plain(), user="carol")
    [msg] = b.receive()  # the good one arrives; the broken one does not block it
    msg.ack()
    assert [data for _, data in folder(fresh, "carol", "medsecure-quarantine")] == [broken]
    assert [data for _, data in folder(fresh, "carol")] == [plain()]
    assert b.receive() == []


def test_mail_section_of_the_home_configuration(
    pki: Pki, smtp: SmtpServer, fresh: Dovecot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MS_TEST_SMTP_PW", USERS["carol"])
    monkeypatch.setenv("MS_TEST_IMAP_PW", USERS["carol"])
    section = {
        "kind": "mail",
        "address": addr("carol"),
        "smtp": {
            "host": HOST,
            "port": smtp.port,
            "security": "starttls",
            "username": "carol",
            "password_env": "MS_TEST_SMTP_PW",
            "ca_file": str(pki.ca),
        },
        "imap": {
            "host": HOST,
            "port": fresh.ssl_port,
            "security": "tls",
            "username": "carol",
            "password_env": "MS_TEST_IMAP_PW",
            "ca_file": str(pki.ca),
        },
        "folders": {"processed": "Traités", "quarantine": "Quarantaine"},
        "product_reference": "NIL-TEST-0001",
        "mssante_fallback": True,
    }
    home = tmp_path / "home"
    m.init_home(
        home,
        passphrase="pw",
        me="810000000017",
        transports=[section],
        endpoints=[Endpoint(kind="mail", address=addr("carol"))],
        trust={"mode": "unsafe-tofu"},
    )
    with m.client_from_home(home, passphrase="pw") as client:
        [_, mail] = client.transports
        assert isinstance(mail, MailTransport)
        assert mail.mssante_fallback and mail.product_reference == "NIL-TEST-0001"
        mail.deliver(
            Endpoint(kind="mail", address=addr("carol")),
            io.BytesIO(b"x" * 100),
            message_id=ULID,
            size=100,
        )
        [item] = mail.list()
        mail.take(item, tmp_path / "t.msec")
        mail.acknowledge(item)
        mail.close()
    assert len(folder(fresh, "carol", "Traités")) == 1

    # a missing password is a configuration error, named as such
    monkeypatch.delenv("MS_TEST_SMTP_PW")
    transport = MailTransport.from_config(section)
    with pytest.raises(m.ConfigError, match="MS_TEST_SMTP_PW"):
        transport.deliver(
            Endpoint(kind="mail", address=addr("carol")),
            io.BytesIO(b"x"),
            message_id=ULID,
            size=1,
        )
    assert len(smtp.state.messages) == 1
    for bad, match in [
        ({**section, "smtp": {**section["smtp"], "pasword_env": "X"}}, "unknown field"),  # type: ignore[dict-item]
        ({**section, "smtp": {**section["smtp"], "ca_file": "/nonexistent.pem"}}, "TLS"),  # type: ignore[dict-item]
        ({**section, "address": "not an address"}, "address"),
        ({**section, "imap": {"port": 993}}, "host"),
        ({**section, "maildir": "/x"}, "imap or maildir"),
        ({**section, "folders": {"processed": "INBOX"}}, "differ"),
    ]:
        with pytest.raises(m.ConfigError, match=match):
            MailTransport.from_config(bad)


def test_rules_and_errors_without_servers(tmp_path: Path) -> None:
    from medsecure.transports._mailrules import REPORT_STATUS, classify_header

    assert issubclass(MailFormatError, m.TransportError)
    assert issubclass(PatientMailboxForbidden, m.DeliveryRejected)
    assert not hasattr(m, "MailFormatError") and "MailFormatError" not in m.__all__
    # every status a mail report can carry maps to one the outbox knows
    assert set(REPORT_STATUS.values()) == {"delivered", "read", "failed", "delayed"}
    assert classify_header(b"\xff\xfe garbage").kind == "foreign"
    assert classify_header(plain()).kind == "foreign"
    t = MailTransport(addr("carol"))  # send-only and receive-only pieces are optional
    assert t.list() == []
    assert not t.accepts(Endpoint(kind="mail", address=addr("dave")))
    with pytest.raises(ValueError):
        t.take(Incoming("imap:1:1", None), tmp_path / "x")


# -- 200 MiB in bounded memory ----------------------------------------------------------------


class Generated(io.RawIOBase):
    """``size`` bytes produced on demand (a random 1 MiB block, rotated per chunk) and hashed
    as they are read: a large envelope that is never on disk nor in memory whole."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.left = size
        self.base = os.urandom(1 << 20)
        self.n = 0
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        k = min(len(view), self.left, len(self.base))
        if k <= 0:
            return 0
        r = (self.n * 7919) % len(self.base)
        self.n += 1
        chunk = (self.base[r:] + self.base[:r])[:k]
        view[:k] = chunk
        self.sha.update(chunk)
        self.left -= k
        return k


@pytest.mark.slow
def test_200_mib_envelope_sent_and_received_in_bounded_memory(
    pki: Pki, fresh: Dovecot, tmp_path: Path
) -> None:
    import tracemalloc

    from mailservers import smtp_sink

    source = Generated(200 << 20)
    # the server side lives in another process (its memory is not the client's): an SMTP sink
    # delivering into erin's Maildir, which dovecot serves over IMAP
    with smtp_sink(pki, fresh.maildir_of("erin")) as (port, proc):
        smtp_conf = MailServer(
            host=HOST, port=port, username="u", password=lambda: "p", ca_file=str(pki.ca)
        )
        with MailTransport(addr("dave"), smtp=smtp_conf) as sender:
            tracemalloc.start()
            try:
                sender.deliver(
                    Endpoint(kind="mail", address=addr("erin")),
                    io.BufferedReader(source, 1 << 16),  # type: ignore[arg-type]
                    message_id=ULID,
                    size=source.size,
                )
                _, send_peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("received ")
    assert source.left == 0

    with MailTransport(addr("erin"), imap=imap_settings(fresh, "erin")) as receiver:
        [item] = receiver.list()
        assert item.kind == "envelope" and item.message_id == ULID
        target = tmp_path / "big.msec"
        tracemalloc.start()
        try:
            receiver.take(item, target)
            _, take_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        receiver.acknowledge(item)
    got = hashlib.sha256()
    with target.open("rb") as f:
        while chunk := f.read(1 << 20):
            got.update(chunk)
    assert target.stat().st_size == source.size
    assert got.hexdigest() == source.sha.hexdigest()
    # the 64 MiB budget above the interpreter's baseline is far from reached: the message is
    # produced while it is sent, fetched in 1 MiB parts and decoded while it is read
    assert send_peak < 8 << 20, f"send peak {send_peak}"
    assert take_peak < 16 << 20, f"take peak {take_peak}"


def test_servers_from_dns_srv_records(pki: Pki) -> None:
    """``discover``: a server section without a host takes it from the RFC 6186 records of
    the address's domain (a DNS responder on loopback), only a target inside that domain."""
    from mailservers import DnsResponder

    records = {
        "_submissions._tcp.medecin.mssante.fr.": [(0, 1, 465, "smtp.medecin.mssante.fr.")],
        "_imaps._tcp.medecin.mssante.fr.": [(0, 1, 993, "imap.elsewhere.example.")],
        "_imap._tcp.medecin.mssante.fr.": [(0, 1, 143, "imap.medecin.mssante.fr.")],
    }
    with DnsResponder(records) as dns:
        section = {
            "kind": "mail",
            "address": addr("carol"),
            "discover": {"nameserver": HOST, "port": dns.port},
            "smtp": {"username": "carol", "password_env": "X", "ca_file": str(pki.ca)},
            "imap": {"username": "carol", "password_env": "X", "ca_file": str(pki.ca)},
        }
        t = MailTransport.from_config(section)
        assert t._submitter is not None and isinstance(t._box, m.mail._imap.ImapMailbox)
        smtp_conf, imap_conf = t._submitter.server, t._box.server
        assert (smtp_conf.host, smtp_conf.port, smtp_conf.security) == (
            "smtp.medecin.mssante.fr",
            465,
            "tls",
        )
        # the IMAPS target lies outside the domain: the STARTTLS one inside it is taken
        assert (imap_conf.host, imap_conf.port, imap_conf.security) == (
            "imap.medecin.mssante.fr",
            143,
            "starttls",
        )
        with pytest.raises(m.ConfigError, match="no smtp server"):
            MailTransport.from_config({**section, "address": "x@other.mssante.fr"})
        with pytest.raises(m.ConfigError, match="host"):
            MailTransport.from_config({**section, "discover": False})


def test_config_section_from_command_line_settings(tmp_path: Path, pki: Pki) -> None:
    """What ``medsecure init`` writes for its mail options, read back by the client."""
    section = MailTransport.config_section(
        "dr.martin@medecin.mssante.fr",
        smtp="smtp.operator.example:587",
        imap="imap.operator.example",
        password_env="MY_MAIL_PW",
        ca_file=pki.ca,
        product_reference="NIL-TEST-0001",
        mssante_fallback=True,
    )
    assert section["smtp"] == {
        "host": "smtp.operator.example",
        "port": 587,
        "security": "starttls",
        "username": "dr.martin@medecin.mssante.fr",
        "password_env": "MY_MAIL_PW",
        "ca_file": str(pki.ca),
    }
    assert section["imap"]["host"] == "imap.operator.example" and "port" not in section["imap"]
    home = tmp_path / "home"
    m.init_home(
        home,
        passphrase="pw",
        me="810000005479",
        transports=[section],
        endpoints=[Endpoint(kind="mail", address="dr.martin@medecin.mssante.fr")],
        trust={"mode": "unsafe-tofu"},
    )
    with m.client_from_home(home, passphrase="pw") as client:
        [mail] = [t for t in client.transports if isinstance(t, MailTransport)]
        assert mail.address == "dr.martin@medecin.mssante.fr" and mail.mssante_fallback
    for kwargs, match in [
        ({"smtp": "s", "imap": "i", "maildir": "d"}, "not both"),
        ({}, "SMTP server"),
        ({"smtp": "s:x"}, "HOST:PORT"),
        ({"smtp": "s", "mssante_fallback": True}, "X-MSS-NIL"),
    ]:
        with pytest.raises(ValueError, match=match):
            MailTransport.config_section("a@medecin.mssante.fr", **kwargs)  # type: ignore[arg-type]
