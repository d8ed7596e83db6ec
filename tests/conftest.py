from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import medsecure


@pytest.fixture(scope="session")
def alice() -> medsecure.Identity:
    return medsecure.Identity.generate()


@pytest.fixture(scope="session")
def bob() -> medsecure.Identity:
    return medsecure.Identity.generate()


@pytest.fixture(scope="session")
def carol() -> medsecure.Identity:
    return medsecure.Identity.generate()


@pytest.fixture(scope="session")
def dave_classic() -> medsecure.Identity:
    return medsecure.Identity.generate("classic")


@pytest.fixture(scope="session")
def erin_classic() -> medsecure.Identity:
    return medsecure.Identity.generate("classic")


# Cheap key-file parameters for tests that save many files (bounds still apply).
FAST_KDF = {"kdf_iterations": 1, "kdf_memory_kib": 8 * 1024, "kdf_lanes": 1}


@pytest.fixture(scope="session")
def pg():
    """A real PostgreSQL cluster on loopback (tests/pgkit.py); one per test session."""
    from pgkit import Postgres

    cluster = Postgres()
    yield cluster
    cluster.destroy()


@pytest.fixture(params=["async", "sync"])
def driver(request: pytest.FixtureRequest):
    """A maker of relay transport drivers (tests/relaykit.py), once per kind, each closed after
    the test; ``driver.kind`` says which."""
    from relaykit import DRIVERS

    made = []

    def make(identity, url, **kw):  # type: ignore[no-untyped-def]
        d = DRIVERS[request.param](identity, url, **kw)
        made.append(d)
        return d

    make.kind = request.param  # type: ignore[attr-defined]
    yield make
    for d in made:
        d.close()
