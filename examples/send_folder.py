"""Send every PDF of a folder to a practitioner, with the client configured from a home.

    python examples/send_folder.py FOLDER --to rpps:10000000017 [--home HOME]

With no arguments it builds a throw-away setup (two homes made with ``medsecure.init_home``,
three PDFs) and sends them, so the tests can run it as it is.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import medsecure as m
from medsecure.directory import FileDirectory


def send_folder(client: m.Client, folder: Path, to: str) -> list[m.SendResult]:
    results = []
    for pdf in sorted(folder.glob("*.pdf")):
        result = client.send(m.Document.from_path(pdf, title=pdf.stem), to=to, subject=pdf.stem)
        print(f"{pdf.name}: {result.message_id} {[s.status for s in result.recipients]}")
        results.append(result)
    return results


def demo() -> int:
    with tempfile.TemporaryDirectory(prefix="medsecure-folder-") as tmp:
        root = Path(tmp)
        m.init_home(
            root / "sender",
            passphrase="demo",
            me="rpps:10000005479",
            family_name="MARTIN",
            trust={"mode": "unsafe-tofu"},
        )
        m.init_home(
            root / "recipient",
            passphrase="demo",
            me="rpps:10000000017",
            family_name="PETIT",
            trust={"mode": "unsafe-tofu"},
        )
        # exchange directory entries (in real life: a shared directory, or the Annuaire + keys)
        sender_dir = FileDirectory(root / "sender" / "directory.json")
        recipient_dir = FileDirectory(root / "recipient" / "directory.json")
        sender_dir.add(recipient_dir.lookup("rpps:10000000017"))
        recipient_dir.add(sender_dir.lookup("rpps:10000005479"))
        folder = root / "to-send"
        folder.mkdir()
        for i in range(3):
            (folder / f"resultat-{i + 1}.pdf").write_bytes(b"%PDF-1.7\n" + os.urandom(1000))
        with m.client_from_home(root / "sender", passphrase="demo") as client:
            results = send_folder(client, folder, "rpps:10000000017")
        with m.client_from_home(root / "recipient", passphrase="demo") as inbox:
            received = inbox.receive()
            print(f"recipient got {len(received)} message(s)")
            for msg in received:
                msg.ack()
        return 0 if len(received) == len(results) == 3 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path)
    parser.add_argument("--to")
    parser.add_argument("--home")
    args = parser.parse_args()
    if args.folder is None:
        return demo()
    if not args.to:
        parser.error("--to is required with a folder")
    if not args.folder.is_dir():
        print("send_folder: error: FOLDER does not exist or is not a folder", file=sys.stderr)
        return 1
    try:
        with m.client_from_home(args.home) as client:
            results = send_folder(client, args.folder, args.to)
    except m.MedsecureError as exc:
        print(f"send_folder: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # not the file name: it may name the patient
        print(f"send_folder: error: cannot read a document: {exc.strerror}", file=sys.stderr)
        return 1
    if not results:
        print("send_folder: error: no PDF file in FOLDER", file=sys.stderr)
        return 1
    return 0 if all(r.all_sent for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
