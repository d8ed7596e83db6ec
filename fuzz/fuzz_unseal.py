"""Coverage-guided fuzzing of everything that parses untrusted bytes (atheris).

    pip install atheris
    python fuzz/fuzz_unseal.py --seeds corpus/        # once: seed envelopes and keys
    python fuzz/fuzz_unseal.py -atheris_runs=200000 corpus/

Targets: ``unseal`` (envelopes), ``PublicIdentity.from_bytes`` / ``from_text``, ``Statement.parse``
and the message manifest. The only exceptions allowed out are medsecure's own errors; anything
else (KeyError, IndexError, cbor2 errors, RecursionError, …) is a crash atheris reports.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    import medsecure
    from medsecure._inbox import check_manifest_models
    from medsecure.envelope._message import parse_manifest
    from medsecure.trust import Statement

# A fixed identity, so that a corpus of envelopes addressed to it stays meaningful across runs.
IDENT = medsecure.Identity._from_seeds(
    "classic", x25519_seed=bytes(range(32)), ed25519_seed=bytes(range(32, 64))
)
ALLOWED = (medsecure.MedsecureError,)


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    which = fdp.ConsumeIntInRange(0, 4)
    payload = fdp.ConsumeBytes(fdp.remaining_bytes())
    try:
        if which == 0:
            medsecure.unseal(payload, identity=IDENT)
        elif which == 1:
            medsecure.PublicIdentity.from_bytes(payload)
        elif which == 2:
            medsecure.PublicIdentity.from_text(payload.decode("latin-1"))
        elif which == 3:
            Statement.parse(payload)
        else:
            check_manifest_models(parse_manifest(payload))
    except ALLOWED:
        pass


def write_seeds(folder: Path) -> None:
    """Seed a corpus: envelopes to IDENT (selector byte 0) and public keys (selector 1)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate((0, 1, 100, 20000)):
        env = medsecure.seal(
            bytes(size), sender=IDENT, recipients=[IDENT.public], chunk_size=1 << 14
        )
        (folder / f"envelope-{i}").write_bytes(b"\x00" + env)
    (folder / "public").write_bytes(b"\x01" + IDENT.public.to_bytes())
    vectors = Path(__file__).resolve().parent.parent / "tests" / "vectors"
    for p in sorted(vectors.glob("*.json")):
        (folder / f"vector-{p.stem}").write_bytes(
            b"\x00" + bytes.fromhex(json.loads(p.read_text())["envelope"])
        )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--seeds":
        write_seeds(Path(sys.argv[2]))
        sys.exit(0)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
