"""Directory benchmarks, against the loopback Annuaire test server.

    python bench/bench_directory.py

Prints the cost of a cached lookup (memory hit of CachedDirectory; by address, that includes
checking in SQLite that no other kept entry claims the address) next to an uncached FHIR
lookup measured in the same run, and the number of HTTP requests needed to resolve 100
recipients with ``lookup_many`` (batched ``identifier=a,b,c``) against one request per lookup.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fhir_server import AnnuaireServer, sample_data

from medsecure.directory import CachedDirectory, FhirDirectory


def per_call(fn, n: int) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best


def main() -> None:
    with (
        AnnuaireServer(sample_data(extra_bernards=150)) as srv,
        tempfile.TemporaryDirectory() as tmp,
    ):
        fhir = FhirDirectory(srv.base_url, api_key="test-key")
        uncached = per_call(lambda: fhir.lookup("rpps:10000005479"), 50)
        cache = CachedDirectory(fhir, path=Path(tmp) / "cache.sqlite", ttl=3600)
        cache.lookup("rpps:10000005479")
        cache.lookup("sophie.martin@medecin.mssante.fr")  # an address is kept once it was asked
        cached = per_call(lambda: cache.lookup("rpps:10000005479"), 20000)
        cached_addr = per_call(lambda: cache.lookup("sophie.martin@medecin.mssante.fr"), 20000)
        print("## lookups (best of 5)")
        print(f"uncached FHIR lookup over loopback HTTP: {uncached * 1e6:9.1f} µs")
        print(f"cached lookup by RPPS                  : {cached * 1e6:9.1f} µs")
        print(f"cached lookup by MSSanté address       : {cached_addr * 1e6:9.1f} µs")
        print(f"RATIO cached / 100 µs target = {cached / 100e-6:.3f}  (target well under 1)")
        print(f"RATIO uncached / cached = {uncached / cached:.0f}x")

        refs = [f"rpps:2{i:010d}" for i in range(100)]
        batched = FhirDirectory(srv.base_url, api_key="test-key")
        t = time.perf_counter()
        found = batched.lookup_many(refs)
        t_batched = time.perf_counter() - t
        assert len(found) == 100
        one_by_one = FhirDirectory(srv.base_url, api_key="test-key")
        t = time.perf_counter()
        for ref in refs:
            one_by_one.lookup(ref)
        t_single = time.perf_counter() - t
        print("## resolving 100 recipients")
        print(f"lookup_many: {batched.requests_made} requests, {t_batched * 1e3:.0f} ms")
        print(f"100 x lookup: {one_by_one.requests_made} requests, {t_single * 1e3:.0f} ms")
        print(
            f"RATIO requests batched / one-by-one = {batched.requests_made / one_by_one.requests_made:.2f}"
        )
        print(f"RATIO time one-by-one / batched = {t_single / t_batched:.1f}x")
        cache.close()
        batched.close()
        one_by_one.close()


if __name__ == "__main__":
    main()
