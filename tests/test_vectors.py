"""Re-check every committed envelope vector, and check the generator that makes them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import medsecure
from medsecure import Identity, PublicIdentity

VECTORS = Path(__file__).parent / "vectors"
FILES = sorted(VECTORS.glob("*.json"))
EXPECT = {
    "EnvelopeError": medsecure.EnvelopeError,
    "NotARecipient": medsecure.NotARecipient,
    "SenderMismatch": medsecure.SenderMismatch,
}


def check(vector: dict[str, Any]) -> None:
    r = vector["recipient"]
    s = {k: bytes.fromhex(v) for k, v in r["seeds"].items()}
    ident = Identity._from_seeds(
        r["suite"],
        x25519_seed=s["x25519"],
        ed25519_seed=s["ed25519"],
        mlkem_seed=s.get("mlkem"),
        mldsa_seed=s.get("mldsa"),
    )
    expected_sender = (
        PublicIdentity.from_bytes(bytes.fromhex(vector["expected_sender"]))
        if vector["expected_sender"]
        else None
    )
    env = bytes.fromhex(vector["envelope"])
    if vector["expect"] == "success":
        res = medsecure.unseal(env, identity=ident, expected_sender=expected_sender)
        assert res.data == bytes.fromhex(vector["plaintext"])
        assert res.sender.fingerprint == vector["sender_fingerprint"]
    else:
        with pytest.raises(EXPECT[vector["expect"]]) as info:
            medsecure.unseal(env, identity=ident, expected_sender=expected_sender)
        # the most specific class, not merely a parent
        if vector["expect"] == "EnvelopeError":
            assert type(info.value) is medsecure.EnvelopeError


def test_vectors_exist() -> None:
    assert len(FILES) >= 20
    outcomes = {json.loads(p.read_text())["expect"] for p in FILES}
    assert outcomes == {"success", "EnvelopeError", "NotARecipient", "SenderMismatch"}


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_committed_vector(path: Path) -> None:
    check(json.loads(path.read_text()))


def test_generator_reproduces_outcomes(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(VECTORS / "generate.py"), str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    committed = {p.name: json.loads(p.read_text()) for p in FILES}
    assert fresh.keys() == committed.keys()
    for name, vector in fresh.items():
        check(vector)
        old = committed[name]
        assert vector["expect"] == old["expect"]
        assert vector["recipient"] == old["recipient"]  # identities are deterministic
        assert vector.get("plaintext") == old.get("plaintext")
