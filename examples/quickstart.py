"""Quickstart: two practitioners exchange a PDF through a drop folder.

    python examples/quickstart.py

Everything happens in a temporary folder: a directory authority signs both practitioners'
keys, Dr Martin sends a consultation report to Dr Petit through Dr Petit's drop folder (a
shared folder, a USB key, …), Dr Petit receives it, verifies who sent it, saves it and
acknowledges it.
"""

from __future__ import annotations

import datetime as dt
import sys
import tempfile
from pathlib import Path

import medsecure as m
from medsecure.directory import MemoryDirectory
from medsecure.models import Code, Endpoint, KeyEntry, Practitioner
from medsecure.transports import FileTransport
from medsecure.trust import AuthorityPolicy, sign_binding


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="medsecure-quickstart-") as tmp:
        root = Path(tmp)
        now = dt.datetime.now(dt.UTC)
        authority = m.Identity.generate()  # e.g. the software vendor's directory key

        def practitioner(
            idnps: str, family: str, given: str
        ) -> tuple[m.Identity, Practitioner, Path]:
            identity = m.Identity.generate()
            box = FileTransport.prepare(root / f"drop-{family.lower()}")
            binding = sign_binding(
                authority,
                idnps=idnps,
                key=identity.public,
                not_before=now,
                not_after=now + dt.timedelta(days=365),
            )
            entry = Practitioner(
                idnps=idnps,
                family_name=family,
                given_name=given,
                keys=(KeyEntry(public=identity.public, statements=(binding.to_text(),)),),
                endpoints=(Endpoint(kind="drop", path=str(box)),),
            )
            return identity, entry, box

        martin_id, martin, martin_box = practitioner("810000005479", "MARTIN", "Sophie")
        petit_id, petit, petit_box = practitioner("810000000017", "PETIT", "Luc")
        directory = MemoryDirectory([martin, petit])
        policy = AuthorityPolicy([authority.public])

        report = root / "compte-rendu.pdf"
        report.write_bytes(
            b"%PDF-1.7\n% compte rendu de consultation (fictitious)\n" + b"0" * 50_000
        )

        with m.Client(
            martin_id,
            directory,
            FileTransport(martin_box),
            root / "home-martin",
            trust=policy,
            me=martin.idnps,
        ) as dr_martin:
            result = dr_martin.send(
                m.Document.from_path(
                    report,
                    title="Compte rendu de consultation",
                    document_type=Code(
                        code="11488-4", label="Consult note", system="http://loinc.org"
                    ),
                ),
                to="rpps:10000000017",
                subject="Compte rendu",
            )
            print(f"Dr Martin sent {result.message_id}: {[s.status for s in result.recipients]}")

        with m.Client(
            petit_id,
            directory,
            FileTransport(petit_box),
            root / "home-petit",
            trust=AuthorityPolicy([authority.public]),
            me=petit.idnps,
        ) as dr_petit:
            (message,) = dr_petit.receive()
            doc = message.documents[0]
            saved = doc.save(root / "received.pdf")
            print(
                f"Dr Petit received {message.message_id} from {message.sender.display_name}: {doc.title!r}, {doc.media_type}, {doc.size} bytes"
            )
            ok = saved.read_bytes() == report.read_bytes()
            print(f"identical: {ok}")
            message.ack()
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
