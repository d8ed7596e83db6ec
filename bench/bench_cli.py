"""Whole-process CLI benchmarks: ``medsecure seal`` / ``unseal`` against the age CLI, and start-up.

    python bench/bench_cli.py                 # 256 MiB and 1 GiB, best of 3
    python bench/bench_cli.py --quick         # 64 MiB only, best of 2
    python bench/bench_cli.py --sizes 16 256  # chosen sizes (MiB)

Prints, measured in the same run:
* start-up: the time ``import medsecure`` takes inside the interpreter (``-X importtime``), the
  import time of everything the CLI loads for ``seal`` / ``unseal`` (and whether pydantic, httpx,
  the client or the directory are among it), and the whole-process time of ``medsecure seal
  --help`` against a bare ``python -c pass``;
* the key unlock (Argon2id with the key file's defaults), which every ``seal`` / ``unseal`` pays;
* for each size: the whole process ``medsecure seal FILE`` and ``medsecure unseal`` against
  ``age -r`` and ``age -d`` on the same file, as MB/s and as ratios (> 1: faster than age). The
  age identity is a plain file while medsecure unlocks an encrypted key and signs (age does
  neither), so a zero-byte seal and unseal are timed as well: the CLI's fixed cost per call.

age: ``apt-get install age`` (Debian, Ubuntu), ``brew install age``, or a release binary from
https://github.com/FiloSottile/age/releases. Without it, the age rows are skipped (said so).
The machine may be shared: each figure is the best of several runs; run it on a quiet machine
for published figures. ``MEDSECURE_BENCH_DIR`` chooses where the test files go.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import medsecure

PASSPHRASE = "bench passphrase"  # a throwaway key made for this run
HEAVY = ("pydantic", "httpx", "medsecure._client", "medsecure.directory", "medsecure.models")


def medsecure_command() -> list[str]:
    """The ``medsecure`` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("medsecure")
    return [str(script)] if script.exists() else [sys.executable, "-m", "medsecure.cli"]


def best(fn: Callable[[], object], repeat: int, setup: Callable[[], object] | None = None) -> float:
    """Best wall time over ``repeat`` runs (``setup`` runs untimed before each)."""
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run(cmd: Sequence[str], env: dict[str, str] | None = None) -> None:
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def import_times(code: Sequence[str], repeat: int) -> tuple[float, float, list[str]]:
    """Run a Python process with ``-X importtime``: the best ``medsecure`` cumulative time,
    the best total of all imports (seconds), and the names of the modules it imported."""
    best_pkg = best_total = float("inf")
    names: list[str] = []
    for _ in range(repeat):
        out = subprocess.run(
            [sys.executable, "-X", "importtime", *code],
            check=True,
            capture_output=True,
            text=True,
        )
        total = 0
        names = []
        pkg = 0
        for line in out.stderr.splitlines():
            if not line.startswith("import time:") or "|" not in line:
                continue
            fields = line[len("import time:") :].split("|")
            try:
                own, cumulative = int(fields[0]), int(fields[1])
            except ValueError:  # the header line
                continue
            name = fields[2].strip()
            names.append(name)
            total += own
            if fields[2].rstrip() == " medsecure":  # the top-level package itself
                pkg = cumulative
        best_total = min(best_total, total / 1e6)
        if pkg:
            best_pkg = min(best_pkg, pkg / 1e6)
    return best_pkg, best_total, names


def _heavy(names: Sequence[str]) -> str:
    found = [h for h in HEAVY if any(n == h or n.startswith(h + ".") for n in names)]
    return ", ".join(found) or "none"


def startup(work: Path, repeat: int) -> None:
    print("## start-up")
    pkg, _, names = import_times(["-c", "import medsecure"], repeat)
    print(f"import medsecure (-X importtime)               : {pkg * 1e3:7.1f} ms")
    print(f"  modules above the core loaded by it          : {_heavy(names)}")
    for command in ("seal", "unseal"):
        code = ["-c", f"from medsecure.cli import main; main([{command!r}, '--help'])"]
        _, total, names = import_times(code, repeat)
        print(f"imports of `medsecure {command} --help` (all)     : {total * 1e3:7.1f} ms")
        print(f"  modules above the core loaded                : {_heavy(names)}")
    cli = medsecure_command()
    bare = best(lambda: run([sys.executable, "-c", "pass"]), repeat * 2)
    helped = best(lambda: run([*cli, "seal", "--help"]), repeat * 2)
    print(f"python -c pass (whole process)                 : {bare * 1e3:7.1f} ms")
    print(f"medsecure seal --help (whole process)          : {helped * 1e3:7.1f} ms")
    print(f"RATIO medsecure seal --help / bare python      = {helped / bare:.2f}")
    keyfile = work / "unlock.key"
    medsecure.Identity.generate().save(keyfile, passphrase=PASSPHRASE)
    unlock = best(lambda: medsecure.Identity.load(keyfile, passphrase=PASSPHRASE), repeat)
    print(f"key unlock (Argon2id, key file defaults)       : {unlock * 1e3:7.1f} ms")


def make_file(path: Path, size_mib: int) -> None:
    block = os.urandom(1 << 20)
    with path.open("wb") as fh:
        for _ in range(size_mib):
            fh.write(block)


def cli_vs_age(work: Path, sizes: Sequence[int], repeat: int) -> None:
    cli = medsecure_command()
    env = {**os.environ, "MEDSECURE_PASSPHRASE": PASSPHRASE}
    alice, bob = medsecure.Identity.generate(), medsecure.Identity.generate()
    alice.save(work / "alice.key", passphrase=PASSPHRASE)
    bob.save(work / "bob.key", passphrase=PASSPHRASE)
    (work / "alice.pub").write_text(f"{alice.public}\n")
    (work / "bob.pub").write_text(f"{bob.public}\n")
    age, age_keygen = shutil.which("age"), shutil.which("age-keygen")
    recipient = ""
    if age and age_keygen:
        run([age_keygen, "-o", str(work / "age.key")])
        recipient = next(
            line.split(": ", 1)[1]
            for line in (work / "age.key").read_text().splitlines()
            if line.startswith("# public key:")
        )
    else:
        print("age CLI not installed: the age rows are skipped (apt-get install age)")
    sealed, opened = work / "data.msec", work / "data.out"
    age_ct, age_out = work / "data.age", work / "data.age.out"

    def clean(*paths: Path) -> Callable[[], None]:
        def remove() -> None:  # the CLI refuses to overwrite an output
            for p in paths:
                p.unlink(missing_ok=True)

        return remove

    for size_mib in (0, *sizes):
        plain = work / "data.bin"
        make_file(plain, size_mib)
        seal_cmd = [*cli, "seal", str(plain), "--from", str(work / "alice.key")]
        seal_cmd += ["--to", str(work / "bob.pub"), "-o", str(sealed)]
        unseal_cmd = [*cli, "unseal", str(sealed), "--key", str(work / "bob.key")]
        unseal_cmd += ["--from", str(work / "alice.pub"), "-o", str(opened)]
        t_seal = best(lambda: run(seal_cmd, env), repeat, clean(sealed))
        t_unseal = best(lambda: run(unseal_cmd, env), repeat, clean(opened))
        if size_mib:
            assert opened.read_bytes() == plain.read_bytes()
        label = f"{size_mib} MiB" if size_mib else "0 bytes (fixed cost)"
        print(f"## whole process, {label} (best of {repeat})")

        def rate(t: float, mib: int = size_mib) -> str:
            return f"{(mib << 20) / t / 1e6:8.0f} MB/s" if mib else f"{t * 1e3:8.0f} ms  "

        print(f"medsecure seal   : {rate(t_seal)}")
        print(f"medsecure unseal : {rate(t_unseal)}")
        if recipient:
            assert age is not None
            age_seal = [age, "-r", recipient, "-o", str(age_ct), str(plain)]
            age_open = [age, "-d", "-i", str(work / "age.key"), "-o", str(age_out), str(age_ct)]
            a_seal = best(lambda: run(age_seal), repeat, clean(age_ct))
            a_open = best(lambda: run(age_open), repeat, clean(age_out))
            print(f"age -r           : {rate(a_seal)}")
            print(f"age -d           : {rate(a_open)}")
            print(f"RATIO medsecure seal / age   = {a_seal / t_seal:.2f}  (>1: faster than age)")
            print(f"RATIO medsecure unseal / age = {a_open / t_unseal:.2f}  (>1: faster than age)")
        for p in (plain, sealed, opened, age_ct, age_out):
            p.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB only, fewer repetitions")
    parser.add_argument("--sizes", type=int, nargs="+", help="sizes in MiB")
    parser.add_argument("--repeat", type=int, default=None)
    args = parser.parse_args()
    sizes = args.sizes or ([64] if args.quick else [256, 1024])
    repeat = args.repeat or (2 if args.quick else 3)
    print(
        f"# medsecure CLI benchmark — Python {sys.version.split()[0]}, {os.cpu_count()} cores, "
        f"medsecure {medsecure.__version__}, load average {os.getloadavg()[0]:.2f}"
    )
    with tempfile.TemporaryDirectory(dir=os.environ.get("MEDSECURE_BENCH_DIR")) as tmp:
        work = Path(tmp)
        startup(work, repeat * 2)
        cli_vs_age(work, sizes, repeat)


if __name__ == "__main__":
    main()
