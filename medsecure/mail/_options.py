"""How a client sends the MSSanté profile (for recipients who have an MSSanté mailbox but no
medsecure key): the sender's mailbox, the product reference, and the XDM submission data."""

from __future__ import annotations

from dataclasses import dataclass

from ._headers import check_address
from ._xdm import XdmSubmission

__all__ = ["MssanteOptions"]


@dataclass(frozen=True)
class MssanteOptions:
    """Settings of the MSSanté fallback (``Client(mssante=…)``).

    TLS hop by hop only: the operators' servers see the whole message. A client sends it only
    to a recipient whose directory entry has **no** medsecure key (never to one whose key is
    merely untrusted: that would let whoever breaks the trust check force plain text), and only
    when the caller asked (``send(…, mssante_fallback=True)`` or ``Client(mssante_fallback=True)``);
    the audit log records each such send."""

    address: str
    """The sender's own MSSanté mailbox (From)."""
    product_reference: str
    """``X-MSS-NIL``: the product's reference, given when it was declared to the ANS."""
    submission: XdmSubmission | None = None
    """Author and care-setting codes for the IHE_XDM.ZIP of CDA documents."""
    sender_name: str | None = None
    patient_opposition: bool = False
    patient_may_reply: bool = False
    identify_patient_in_subject: bool = True
    body: str = (
        "Veuillez trouver ci-joint le(s) document(s) concernant votre patient.\n"
        "Please find the attached document(s) about your patient.\n"
    )

    def __post_init__(self) -> None:
        check_address(self.address, "address")
        if not self.product_reference or not self.product_reference.isascii():
            raise ValueError("product_reference (X-MSS-NIL) must be a non-empty ASCII reference")
