"""medsecure demo: two practitioners, one sealed document, nothing to install but medsecure.

    ./scripts/demo

Dr Alice Martin (a GP) sends a consultation report to Dr Bob Durand (a cardiologist):
the document is sealed end to end (post-quantum hybrid), signed by Alice, opened and verified
by Bob. A tampered copy and a stranger are both refused.
"""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

import medsecure


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="medsecure-demo-") as tmp:
        home = Path(tmp)
        print("1. Each practitioner creates an identity (ML-KEM-768 + X25519, Ed25519 + ML-DSA-65)")
        alice = medsecure.Identity.generate()
        bob = medsecure.Identity.generate()
        alice.save(home / "alice.key", passphrase="demo passphrase alice")
        bob.save(home / "bob.key", passphrase="demo passphrase bob")
        print(f"   Dr Alice Martin  fingerprint {alice.fingerprint}")
        print(f"   Dr Bob Durand    fingerprint {bob.fingerprint}")

        print("2. Bob publishes his public key (text form, copy-pasteable)")
        bob_public = medsecure.PublicIdentity.from_text(str(bob.public))
        print(f"   {str(bob_public)[:60]}… ({len(str(bob_public))} characters)")

        print("3. Alice seals a consultation report for Bob")
        report = (
            b"%PDF-1.7\n% Compte rendu de consultation (demo, fictitious patient)\n"
            + b"0" * 200_000
        )
        (home / "report.pdf").write_bytes(report)
        sealed = home / "report.pdf.msec"
        with (home / "report.pdf").open("rb") as src, sealed.open("wb") as dst:
            medsecure.seal_stream(src, dst, sender=alice, recipients=[bob_public])
        print(f"   {len(report)} bytes -> envelope of {sealed.stat().st_size} bytes")

        print("4. Bob loads his key and opens the envelope, expecting Alice as the sender")
        bob_again = medsecure.Identity.load(home / "bob.key", passphrase="demo passphrase bob")
        with sealed.open("rb") as src:
            result = medsecure.unseal_stream(
                src, home / "received.pdf", identity=bob_again, expected_sender=alice.public
            )
        ok = (home / "received.pdf").read_bytes() == report
        print(
            f"   verified sender {result.sender.fingerprint}, {result.size} bytes, identical: {ok}"
        )

        print("5. A tampered copy and a stranger are refused")
        tampered = bytearray(sealed.read_bytes())
        tampered[len(tampered) // 2] ^= 0x01
        try:
            medsecure.unseal(bytes(tampered), identity=bob_again)
        except medsecure.EnvelopeError as exc:
            print(f"   tampered copy: {type(exc).__name__}: {exc}")
        stranger = medsecure.Identity.generate()
        try:
            medsecure.unseal_stream(
                io.BytesIO(sealed.read_bytes()), io.BytesIO(), identity=stranger
            )
        except medsecure.NotARecipient as exc:
            print(f"   stranger: {type(exc).__name__}: {exc}")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
