"""Attacks through the mail transport (docs/security.md §1–§3): delivery reports (DSN, MDN) are
unsigned, so anyone who learns a message id — a co-recipient, a mail operator on the path —
can forge one. They must never outrank a recipient's signed receipt.

Real servers on loopback (aiosmtpd, dovecot), as in test_mail_transport.py, whose fixtures
these tests reuse.
"""

from __future__ import annotations

import test_mail_transport as tm
from mailkit import cda_document
from mailservers import Dovecot, imap_append

import medsecure as m

pki = tm.pki
dovecot = tm.dovecot
fresh = tm.fresh
smtp = tm.smtp
world = tm.world
World = tuple[m.Client, m.Client, tm.Party, tm.Party, tm.MemoryDirectory]


def _forged_dsn(message_id: str, recipient: str, to: str) -> bytes:
    return tm._report(
        "postfix_dsn_failed.eml",
        **{
            "01HXR4T3M5K8Q9V2W6Y7Z0ABCD": message_id,
            "inconnu@hopital-exemple.mssante.fr": recipient,
            "dr.martin@medecin.mssante.fr": to,
        },
    )


def _forged_mdn_error(message_id: str, recipient: str) -> bytes:
    error = (tm.SAMPLES / "mssante_mdn_error.eml").read_bytes()
    error = error.replace(
        b"199509192301.23456 @chb.mssante.fr", f"{message_id}@{tm.DOMAIN}".encode()
    )
    return error.replace(b"serviceY_auto@chb.mssante.fr", recipient.encode())


def test_a_forged_failure_report_after_the_signed_receipt_changes_nothing(
    world: World, fresh: Dovecot
) -> None:
    """Carol received Dave's message and her signed 'delivered' receipt came back. Then a DSN
    saying the delivery to Carol failed arrives (forged by whoever saw the message id): the
    status stays 'delivered' — an unsigned hint never overrides what Carol signed."""
    a, b, dave, carol, _ = world
    sent = a.send(cda_document(), to=f"idnps:{carol.idnps}", receipts=("delivered",))
    [msg] = b.receive()
    msg.ack()
    assert a.receive() == []
    [status] = a.status(sent.message_id)
    assert status.status == "delivered"

    imap_append(fresh, _forged_dsn(sent.message_id, carol.address, dave.address), user="dave")
    imap_append(fresh, _forged_mdn_error(sent.message_id, carol.address), user="dave")
    a.receive()
    [status] = a.status(sent.message_id)
    assert status.status == "delivered"
    assert status.receipts == ("delivered",)


def test_a_forged_failure_report_before_the_signed_receipt_does_not_win(
    world: World, fresh: Dovecot
) -> None:
    """The forged 'processed/Error' MDN arrives before Carol collects the message. Once her
    signed 'delivered' receipt comes back, the status must say delivered, not failed."""
    a, b, _, carol, _ = world
    sent = a.send(cda_document(), to=f"idnps:{carol.idnps}", receipts=("delivered",))
    imap_append(fresh, _forged_mdn_error(sent.message_id, carol.address), user="dave")
    a.receive()
    [msg] = b.receive()
    msg.ack()
    a.receive()
    [status] = a.status(sent.message_id)
    assert status.status == "delivered"
