"""The home folder: configuration sections build transports of any kind; init is all or nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import medsecure as m
from medsecure._home import register_transport
from medsecure.transports import FileTransport, MockTransport


def make(tmp_path: Path, **kw: Any) -> Path:
    home = tmp_path / "home"
    kw.setdefault("trust", {"mode": "unsafe-tofu"})
    m.init_home(home, passphrase="pw", me="rpps:10000005479", **kw)
    return home


def test_transports_section_builds_every_kind(tmp_path: Path) -> None:
    home = make(tmp_path)
    cfg = json.loads((home / "config.json").read_text())
    assert cfg["transports"] == [{"kind": "drop", "path": str((home / "mailbox").resolve())}]
    assert "mailbox" not in cfg
    # a kind of one's own, registered by the application
    built: list[dict[str, Any]] = []

    def pigeon(root: Path, section: dict[str, Any], identity: m.Identity) -> MockTransport:
        built.append(section)
        mock = MockTransport()
        mock.kinds = frozenset({"pigeon"})  # type: ignore[misc]
        return mock

    register_transport("pigeon", pigeon)
    cfg["transports"].append({"kind": "pigeon", "loft": "north"})
    (home / "config.json").write_text(json.dumps(cfg))
    with m.client_from_home(home, passphrase="pw") as client:
        assert [type(t) for t in client.transports] == [FileTransport, MockTransport]
    assert built == [{"kind": "pigeon", "loft": "north"}]


def test_first_release_mailbox_form_still_reads(tmp_path: Path) -> None:
    home = make(tmp_path)
    cfg = json.loads((home / "config.json").read_text())
    cfg["mailbox"] = cfg.pop("transports")[0]["path"]
    (home / "config.json").write_text(json.dumps(cfg))
    with m.client_from_home(home, passphrase="pw") as client:
        assert isinstance(client.transports[0], FileTransport)


@pytest.mark.parametrize(
    ("transports", "match"),
    [
        ([{"kind": "carrier-owl"}], "unknown transport kind"),
        ([{"path": "/x"}], "'kind'"),
        ([], "no 'transports'"),
        ([{"kind": "drop"}], "needs 'path'"),
    ],
)
def test_bad_transport_sections_are_config_errors(
    tmp_path: Path, transports: list[dict[str, Any]], match: str
) -> None:
    home = make(tmp_path)
    cfg = json.loads((home / "config.json").read_text())
    cfg["transports"] = transports
    (home / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(m.ConfigError, match=match):
        m.client_from_home(home, passphrase="pw")


def test_failed_init_leaves_nothing_behind(tmp_path: Path) -> None:
    home = tmp_path / "new-home"
    with pytest.raises(m.ConfigError):
        m.init_home(
            home,
            passphrase="pw",
            me="rpps:10000005479",
            transports=[{"kind": "owl"}],
            trust={"mode": "unsafe-tofu"},
        )
    assert not home.exists()
    with pytest.raises(ValueError):
        m.init_home(home, passphrase="pw", me="not an identifier", trust={"mode": "unsafe-tofu"})
    assert not home.exists()
    # a failure half-way (the drop section refers to an unusable path) removes what was made,
    # and leaves a folder that existed before as it was
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    with pytest.raises(m.ConfigError):
        m.init_home(
            home,
            passphrase="pw",
            me="rpps:10000005479",
            transports=[{"kind": "drop", "path": ""}],
            trust={"mode": "unsafe-tofu"},
        )
    assert sorted(p.name for p in home.iterdir()) == ["notes.txt"]


def test_init_with_a_relay_exchanges_through_it(tmp_path: Path) -> None:
    """``init_home(relay=URL)``: the home's client reaches the relay, and its own directory entry
    names its mailbox there (its fingerprint) before the drop folder."""
    from relaykit import RelayServer

    from medsecure.directory import FileDirectory
    from medsecure.transports import RelayTransport

    with RelayServer(tmp_path / "relay.log", data=tmp_path / "relay") as srv:
        homes = {}
        for name, ref in (("alice", "rpps:10000005479"), ("bob", "rpps:10000000017")):
            homes[name] = tmp_path / name
            m.init_home(
                homes[name],
                passphrase="pw",
                me=ref,
                relay=srv.url,
                mailbox=tmp_path / f"box-{name}",
                trust={"mode": "unsafe-tofu"},
            )
        entries = {n: FileDirectory(h / "directory.json").all()[0] for n, h in homes.items()}
        assert [e.kind for e in entries["bob"].endpoints] == ["relay", "drop"]
        # each adds the other (trust on first use: the key the directory lists)
        for me, other in (("alice", "bob"), ("bob", "alice")):
            FileDirectory(homes[me] / "directory.json").add(entries[other])
        # the drop folders vanish: only the relay can carry the message
        for name in homes:
            import shutil

            shutil.rmtree(tmp_path / f"box-{name}")
        with m.client_from_home(homes["alice"], passphrase="pw") as ca:
            assert isinstance(ca.transports[0], RelayTransport)
            r = ca.send(m.Document(content=b"via the relay"), to="rpps:10000000017")
            assert [s.endpoint for s in r.recipients] == ["relay"]
        with m.client_from_home(homes["bob"], passphrase="pw") as cb:
            (msg,) = cb.receive()
            assert msg.documents[0].read() == b"via the relay"


def test_with_a_network_endpoint_the_drop_folder_is_tried_last(tmp_path: Path) -> None:
    """A home with a relay or a mail address lists its drop folder with priority 1, so that a
    correspondent tries the network first (a drop folder is usually reachable on one machine
    only, and a missing one would hold messages back as "retry later")."""
    from medsecure.directory import FileDirectory
    from medsecure.models import Endpoint

    home = tmp_path / "h"
    m.init_home(
        home,
        passphrase="pw",
        me="rpps:10000005479",
        endpoints=[Endpoint(kind="mail", address="dr.martin@medecin.mssante.fr")],
        trust={"mode": "unsafe-tofu"},
    )
    (own,) = FileDirectory(home / "directory.json").all()
    assert [(e.kind, e.priority) for e in own.endpoints] == [("drop", 1), ("mail", 0)]
    plain = tmp_path / "p"
    m.init_home(plain, passphrase="pw", me="rpps:10000000017", trust={"mode": "unsafe-tofu"})
    (own,) = FileDirectory(plain / "directory.json").all()
    assert [(e.kind, e.priority) for e in own.endpoints] == [("drop", 0)]
