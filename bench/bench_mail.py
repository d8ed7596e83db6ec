"""Mail transport benchmarks: every figure is a ratio against a baseline measured in the same run.

    python bench/bench_mail.py            # 500 messages, 200 MiB memory check
    python bench/bench_mail.py --quick    # 100 messages, 32 MiB memory check

Prints:
* messages per second for 10 KiB documents through aiosmtpd (STARTTLS, AUTH, one reused
  connection), for plain smtplib sending the same prepared message bytes over the same server
  (the floor: TLS, SMTP and the server), for MailTransport.deliver of a sealed envelope
  (packaging + submission), and for seal + deliver (what a send costs on the wire side); the
  ratios say what building, sealing and packaging add;
* the peak resident memory (VmHWM) above the interpreter's baseline while a large envelope is
  sent through MailTransport and received again from dovecot over IMAP (target: 64 MiB).

The SMTP server runs in its own process (tests/mailservers.py's sink), so its work does not
count in the client's figures. The machine is shared and noisy: each timing is the best of
several repetitions; the lead publishes figures measured on a quiet machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from mailservers import HOST, Dovecot, DovecotUnavailable, make_pki, smtp_sink

import medsecure
from medsecure.envelope._message import new_message_id
from medsecure.mail import build_e2e_message
from medsecure.mail._config import MailServer
from medsecure.models import Endpoint
from medsecure.transports import MailTransport

SENDER = "dave@medecin.mssante.fr"
RECIPIENT = "erin@medecin.mssante.fr"


def _drain(proc: subprocess.Popen[str]) -> threading.Thread:
    """Read the sink's one line per message so that its pipe never fills."""

    def run() -> None:
        assert proc.stdout is not None
        for _ in proc.stdout:
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _ids(n: int) -> list[str]:
    return [new_message_id(dt.datetime.now(dt.UTC)) for _ in range(n)]


def throughput(n: int, repeat: int, pki_root: Path) -> None:
    pki = make_pki(pki_root)
    alice, bob = medsecure.Identity.generate(), medsecure.Identity.generate()
    doc = os.urandom(10 * 1024)
    envelope = medsecure.seal(doc, sender=alice, recipients=[bob.public])
    ids = _ids(n)
    prepared = [
        b"".join(
            build_e2e_message(
                io.BytesIO(envelope),
                sender=SENDER,
                recipients=[RECIPIENT],
                message_id=mid,
                date=dt.datetime.now(dt.UTC),
            ).iter_chunks()
        )
        for mid in ids
    ]
    with smtp_sink(pki) as (port, proc):
        _drain(proc)
        conf = MailServer(
            host=HOST, port=port, username="u", password=lambda: "p", ca_file=str(pki.ca)
        )

        def plain_smtplib(nodelay: bool) -> float:
            ctx = ssl.create_default_context(cafile=str(pki.ca))
            t0 = time.perf_counter()
            with smtplib.SMTP(HOST, port, timeout=60) as s:
                if nodelay:
                    assert s.sock is not None
                    s.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.starttls(context=ctx)
                s.login("u", "p")
                for data in prepared:
                    s.sendmail(SENDER, [RECIPIENT], data)
            return time.perf_counter() - t0

        def transport_only() -> float:
            t0 = time.perf_counter()
            with MailTransport(SENDER, smtp=conf) as t:
                ep = Endpoint(kind="mail", address=RECIPIENT)
                for mid in ids:
                    t.deliver(ep, io.BytesIO(envelope), message_id=mid, size=len(envelope))
            return time.perf_counter() - t0

        def seal_and_deliver() -> float:
            t0 = time.perf_counter()
            with MailTransport(SENDER, smtp=conf) as t:
                ep = Endpoint(kind="mail", address=RECIPIENT)
                for mid in ids:
                    env = medsecure.seal(doc, sender=alice, recipients=[bob.public])
                    t.deliver(ep, io.BytesIO(env), message_id=mid, size=len(env))
            return time.perf_counter() - t0

        naive = min(plain_smtplib(False) for _ in range(repeat))
        base = min(plain_smtplib(True) for _ in range(repeat))
        pack = min(transport_only() for _ in range(repeat))
        full = min(seal_and_deliver() for _ in range(repeat))
    print(f"## {n} messages of a 10 KiB document, one reused STARTTLS connection")
    print(f"plain smtplib, prepared bytes      : {n / naive:8.0f} msg/s (Nagle on, as shipped)")
    print(f"plain smtplib + TCP_NODELAY        : {n / base:8.0f} msg/s (the floor)")
    print(f"MailTransport.deliver (packaging)  : {n / pack:8.0f} msg/s")
    print(f"seal + MailTransport.deliver       : {n / full:8.0f} msg/s")
    print(f"RATIO deliver / smtplib+nodelay      = {base / pack:.2f}  (1.0: packaging is free)")
    print(f"RATIO seal+deliver / smtplib+nodelay = {base / full:.2f}")
    print(f"RATIO deliver / plain smtplib        = {naive / pack:.2f}")


_MEMORY_CHILD = r"""
import hashlib, io, os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from medsecure.mail._config import MailServer
from medsecure.models import Endpoint
from medsecure.transports import MailTransport, Incoming

def hwm():
    # VmHWM is the peak resident set of this process image
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

mode, ca, port, size_mib, work = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
MID = "01HXR4T3M5K8Q9V2W6Y7Z0ABCD"

class Generated(io.RawIOBase):
    def __init__(self, size):
        self.left = size
        self.base = os.urandom(1 << 20)
        self.n = 0
    def readable(self):
        return True
    def readinto(self, buf):
        view = memoryview(buf).cast("B")
        k = min(len(view), self.left, len(self.base))
        if k <= 0:
            return 0
        r = (self.n * 7919) % len(self.base)
        self.n += 1
        view[:k] = (self.base[r:] + self.base[:r])[:k]
        self.left -= k
        return k

if mode == "send":
    conf = MailServer(host="127.0.0.1", port=port, username="u", password=lambda: "p", ca_file=ca)
    t = MailTransport("dave@medecin.mssante.fr", smtp=conf)
    base = hwm()
    size = size_mib << 20
    t.deliver(Endpoint(kind="mail", address="erin@medecin.mssante.fr"),
              io.BufferedReader(Generated(size), 1 << 16), message_id=MID, size=size)
    t.close()
else:
    conf = MailServer(host="127.0.0.1", port=port, security="tls", username="erin",
                      password=lambda: "erin pass 1", ca_file=ca)
    t = MailTransport("erin@medecin.mssante.fr", imap=conf)
    [item] = t.list()
    base = hwm()
    target = Path(work) / "big.msec"
    t.take(item, target)
    t.close()
    assert target.stat().st_size == size_mib << 20
    target.unlink()
print(base, hwm())
"""


def memory(size_mib: int, pki_root: Path, work: Path) -> None:
    pki = make_pki(pki_root)
    tests = str(Path(__file__).resolve().parent.parent / "tests")
    server = Dovecot(pki, users={"erin": "erin pass 1"})
    try:
        server.start()
    except DovecotUnavailable as exc:
        server.stop()
        print(f"dovecot cannot be started here ({exc}): the receive figure is skipped")
        return
    try:
        import imaplib

        ctx = ssl.create_default_context(cafile=str(pki.ca))
        with imaplib.IMAP4_SSL(HOST, server.ssl_port, ssl_context=ctx) as imap:
            imap.login("erin", "erin pass 1")
            imap.select("INBOX")  # dovecot creates the Maildir
            imap.logout()
        figures = {}
        with smtp_sink(pki, server.maildir_of("erin")) as (port, proc):
            res = subprocess.run(
                [sys.executable, "-c", _MEMORY_CHILD, tests, "send", str(pki.ca), str(port),
                 str(size_mib), str(work)],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            figures["send"] = [int(x) for x in res.stdout.split()]
            assert proc.stdout is not None
            proc.stdout.readline()
        res = subprocess.run(
            [sys.executable, "-c", _MEMORY_CHILD, tests, "take", str(pki.ca), str(server.ssl_port),
             str(size_mib), str(work)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        figures["take"] = [int(x) for x in res.stdout.split()]
    finally:
        server.stop()
    print(f"## peak memory, {size_mib} MiB envelope (VmHWM, client process only)")
    for what, (base, peak) in figures.items():
        label = "sent (SMTP)" if what == "send" else "received (IMAP take)"
        print(f"interpreter + medsecure baseline before {label}: {base / 1024:.1f} MiB")
        print(
            f"RATIO-MEM {label} peak above baseline = {(peak - base) / 1024:.1f} MiB (target <= 64)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n, repeat, size = (100, 2, 32) if args.quick else (500, 3, 200)
    with tempfile.TemporaryDirectory(prefix="bench-mail-") as tmp:
        work = Path(tmp)
        throughput(n, repeat, work / "pki-a")
        memory(size, work / "pki-b", work)


if __name__ == "__main__":
    main()
