"""Receive into a folder: every verified message becomes a sub-folder with its documents.

    python examples/receive_to_folder.py OUT [--home HOME]

Messages are acknowledged only after their documents are saved (at-least-once: a crash in
between delivers them again, under the same message id). What is saved is health data: folders
are created 0700 and files 0600, each written atomically. With no arguments it runs on a
throw-away setup so the tests can run it as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import medsecure as m
from medsecure.directory import FileDirectory


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` readable by you only (0600), atomically: a temporary file, then a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def receive_into(client: m.Client, out: Path) -> int:
    count = 0
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    for msg in client.receive():
        folder = out / msg.message_id
        folder.mkdir(mode=0o700, exist_ok=True)
        for i, doc in enumerate(msg.documents):
            doc.save(folder / (doc.filename or f"document-{i + 1}"))
        meta = {
            "from": msg.sender.display_name,
            "idnps": msg.sender.idnps,
            "subject": msg.subject,
            "body": msg.body,
        }
        write_private(folder / "message.json", json.dumps(meta, ensure_ascii=False).encode())
        msg.ack()
        count += 1
    for q in client.quarantine():
        print(f"quarantined #{q.id}: {q.reason}")
    return count


def demo() -> int:
    with tempfile.TemporaryDirectory(prefix="medsecure-receive-") as tmp:
        root = Path(tmp)
        m.init_home(
            root / "a",
            passphrase="demo",
            me="rpps:10000005479",
            family_name="MARTIN",
            given_name="Sophie",
            trust={"mode": "unsafe-tofu"},
        )
        m.init_home(
            root / "b",
            passphrase="demo",
            me="rpps:10000000017",
            family_name="PETIT",
            trust={"mode": "unsafe-tofu"},
        )
        da, db = (
            FileDirectory(root / "a" / "directory.json"),
            FileDirectory(root / "b" / "directory.json"),
        )
        da.add(db.lookup("rpps:10000000017"))
        db.add(da.lookup("rpps:10000005479"))
        with m.client_from_home(root / "a", passphrase="demo") as a:
            a.send(
                [
                    m.Document(content=b"%PDF-1.7 bilan", filename="bilan.pdf"),
                    m.Document(content=b"MSH|^~\\&|LAB", filename="resultats.hl7"),
                ],
                to="rpps:10000000017",
                subject="Bilan",
                body="Bonjour",
            )
        with m.client_from_home(root / "b", passphrase="demo") as b:
            n = receive_into(b, root / "out")
        files = sorted(p.name for p in (root / "out").rglob("*") if p.is_file())
        print(f"received {n} message(s): {files}")
        return 0 if files == ["bilan.pdf", "message.json", "resultats.hl7"] else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path)
    parser.add_argument("--home")
    args = parser.parse_args()
    if args.out is None:
        return demo()
    try:
        with m.client_from_home(args.home) as client:
            print(f"{receive_into(client, args.out)} message(s)")
    except m.MedsecureError as exc:
        print(f"receive_to_folder: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # not the file name: a document's name may name the patient
        print(f"receive_to_folder: error: cannot save: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
