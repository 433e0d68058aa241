#!/usr/bin/env python3
"""HSM benchmark for jarvis-secretsd: unseal and rekey time with the pkcs11 key provider.

Run by hand (this is not a pytest test)::

    python bench/hsm.py
    python bench/hsm.py --terms 1,10,100 --runs 10 --rekey-runs 50 --wrap-runs 500 --json > hsm.json
    python bench/hsm.py --render hsm.json      # the tables of a saved run

Everything runs in this process against a throwaway SoftHSM2 token:

1. ``SOFTHSM2_CONF`` is pointed at a new temporary directory *before* anything can load the
   PKCS#11 library, and the token is provisioned there with ``softhsm/provision-token.sh``; the
   machine's own tokens are never seen. Two KEKs are created in it with ``create_key``: one for
   ``aes-gcm`` and one for ``aes-key-wrap-pad``.
2. For every provider case (pkcs11 aes-gcm, pkcs11 aes-key-wrap-pad, pkcs11 + a ``file`` recovery
   provider, ``file``, ``env-sealed`` at its default Argon2id cost) and every keyring size in
   ``--terms``, a store is initialised in a temporary data dir and given that many terms with
   ``Barrier.rekey()``.
3. (a) unseal: ``Daemon.start()`` on a fresh ``Daemon`` (opens storage, builds the providers: PKCS#11
   login and key lookup, or the Argon2id derivations, then unwraps every term), and
   ``Barrier.unseal()`` again on the started daemon (reads and unwraps every term; providers built).
   (b) rekey: ``Barrier.rekey()`` (what ``POST /v1/sys/keyring/rotate`` runs): wrap a new DEK for
   every provider and store the term (an SQLite write with fsync).
   (c) the providers' raw ``wrap``/``unwrap`` of a 32-byte key, called directly.
4. Prints tables (or ``--json``) with medians, p95 (nearest rank) and ratios to the ``file``
   provider measured in the same run, then removes the temporary directory.

The machine this runs on may be shared: compare ratios within one run, not absolute figures
across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keyproviders import KeyProvider
    from secretsd.runtime.config import Settings

REPO = Path(__file__).resolve().parent.parent
PROVISION_SCRIPT = REPO / "softhsm" / "provision-token.sh"
MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)
TOKEN_LABEL = "secretsd-bench"  # noqa: S105 - a token's name, not a secret
PIN_ENV = "SECRETSD_BENCH_PKCS11_PIN"
PASSPHRASE_ENV = "SECRETSD_BENCH_PASSPHRASE"  # noqa: S105 - the name of a variable, not a secret
KEK_GCM = "bench-kek-gcm"
KEK_KWP = "bench-kek-kwp"
BASELINE = "file"
AAD = b"secretsd:bench"


class BenchError(Exception):
    """Setting up the benchmark failed (no SoftHSM2, provisioning failed, a store did not unseal)."""


# -- statistics ------------------------------------------------------------------------------------
def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sample."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Stat:
    n: int
    median_ms: float
    p95_ms: float
    min_ms: float
    max_ms: float
    cpu_ms: float  # process CPU time (all threads) per run, mean

    @classmethod
    def of(cls, seconds: Sequence[float], cpu_seconds: float) -> Stat:
        return cls(
            n=len(seconds),
            median_ms=statistics.median(seconds) * 1e3,
            p95_ms=percentile(seconds, 95) * 1e3,
            min_ms=min(seconds) * 1e3,
            max_ms=max(seconds) * 1e3,
            cpu_ms=cpu_seconds / len(seconds) * 1e3,
        )


@dataclass
class UnsealResult:
    case: str
    terms: int
    kek_ids: int  # distinct (provider, key id) pairs among the keyring's wrappings
    start: Stat
    unseal: Stat


@dataclass
class RekeyResult:
    case: str
    terms_before: int
    rekey: Stat


@dataclass
class WrapResult:
    case: str
    wrap: Stat
    unwrap: Stat


@dataclass
class Report:
    machine: dict[str, Any]
    settings: dict[str, Any]
    one_off: dict[str, float] = field(default_factory=dict)
    unseal: list[UnsealResult] = field(default_factory=list)
    rekey: list[RekeyResult] = field(default_factory=list)
    wrap: list[WrapResult] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """Read back what ``--json`` printed (for ``--render``)."""

        def stat(d: dict[str, Any]) -> Stat:
            return Stat(**d)

        return cls(
            machine=data["machine"],
            settings=data["settings"],
            one_off=data["one_off"],
            unseal=[UnsealResult(u["case"], u["terms"], u["kek_ids"], stat(u["start"]), stat(u["unseal"]))
                    for u in data["unseal"]],
            rekey=[RekeyResult(r["case"], r["terms_before"], stat(r["rekey"])) for r in data["rekey"]],
            wrap=[WrapResult(w["case"], stat(w["wrap"]), stat(w["unwrap"])) for w in data["wrap"]],
        )


# -- the throwaway token ---------------------------------------------------------------------------
def find_module(explicit: str | None) -> str:
    if explicit:
        if not os.path.isfile(explicit):
            raise BenchError(f"PKCS#11 module {explicit} does not exist")
        return explicit
    override = os.environ.get("SOFTHSM2_MODULE")
    for path in ([override] if override else []) + list(MODULE_CANDIDATES):
        if os.path.isfile(path):
            return path
    raise BenchError("libsofthsm2.so not found (apt-get install softhsm2, or pass --module)")


def provision_token(home: Path) -> str:
    """Provision the bench token in ``home`` with the repository's script; return its user PIN."""
    if shutil.which("softhsm2-util") is None:
        raise BenchError("softhsm2-util is not on PATH (apt-get install softhsm2)")
    user_pin, so_pin = secrets.token_hex(8), secrets.token_hex(8)
    done = subprocess.run(
        ["/bin/sh", str(PROVISION_SCRIPT), str(home), TOKEN_LABEL, so_pin, user_pin],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"provision-token.sh failed: {done.stderr.strip()}")
    if done.stdout.strip() != f"export SOFTHSM2_CONF={home / 'softhsm2.conf'}":
        raise BenchError(f"provision-token.sh printed {done.stdout!r}")
    return user_pin


# -- provider cases --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    specs: tuple[dict[str, Any], ...]  # [key_provider] then [[recovery_providers]]


def cases(module: str, work: Path, names: Sequence[str]) -> list[Case]:
    def pkcs11(label: str, mechanism: str) -> dict[str, Any]:
        return {
            "kind": "pkcs11", "module": module, "token_label": TOKEN_LABEL, "key_label": label,
            "pin_env": PIN_ENV, "mechanism": mechanism,
        }

    recovery_key = work / "keys" / "recovery.key"
    every = {
        "pkcs11 aes-gcm": (pkcs11(KEK_GCM, "aes-gcm"),),
        "pkcs11 aes-key-wrap-pad": (pkcs11(KEK_KWP, "aes-key-wrap-pad"),),
        "pkcs11 aes-gcm + file recovery": (pkcs11(KEK_GCM, "aes-gcm"), {"kind": "file", "path": str(recovery_key)}),
        "file": ({"kind": "file", "path": str(work / "keys" / "master.key")},),
        "env-sealed": ({"kind": "env-sealed", "passphrase_env": PASSPHRASE_ENV},),
    }
    unknown = set(names) - set(every)
    if unknown:
        raise BenchError(f"unknown case(s) {sorted(unknown)}; known: {sorted(every)}")
    return [Case(name, every[name]) for name in every if name in names]


def _toml_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value).lower()


def write_config(path: Path, data_dir: Path, specs: Sequence[dict[str, Any]]) -> Path:
    from secretsd.runtime.config import Settings

    lines = [f"data_dir = {_toml_value(str(data_dir))}"]
    if "audit" in Settings.model_fields:
        # Measure key custody, not the audit log: opening it, signing and fsyncing its records would
        # add to Daemon.start() and compete with rekeys (load.py measures the request path).
        lines += ["[audit]", "enabled = false"]
    lines.append("[key_provider]")
    lines += [f"{k} = {_toml_value(v)}" for k, v in specs[0].items()]
    for extra in specs[1:]:
        lines.append("[[recovery_providers]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def settings_for(work: Path, case: Case, tag: str) -> Settings:
    from secretsd.runtime.config import load_settings

    slug = "".join(ch if ch.isalnum() else "-" for ch in case.name)
    data_dir = work / "stores" / f"{slug}-{tag}"
    config = write_config(work / "configs" / f"{slug}-{tag}.toml", data_dir, case.specs)
    return load_settings(config)


# -- measurements ----------------------------------------------------------------------------------
async def build_store(settings: Settings, terms: int) -> None:
    """Initialise a store and give it ``terms`` keyring terms."""
    from secretsd.runtime.daemon import Daemon, initialize_store

    await initialize_store(settings)
    daemon = Daemon(settings)
    await daemon.start()
    try:
        if daemon.barrier.sealed:
            raise BenchError(f"a new store did not unseal: {daemon.barrier.last_error}")
        for _ in range(terms - 1):
            await daemon.barrier.rekey(reason="bench")
    finally:
        await daemon.stop()


async def kek_ids(settings: Settings) -> int:
    from secretsd.runtime.daemon import build_storage

    storage = build_storage(settings)
    await storage.open()
    try:
        return len({(w.provider, w.key_id) for t in await storage.keyring_terms() for w in t.wrappings})
    finally:
        await storage.close()


async def measure_unseal(settings: Settings, runs: int) -> tuple[Stat, Stat]:
    """``Daemon.start()`` on a fresh daemon, then ``Barrier.unseal()`` again on it, ``runs`` times."""
    from secretsd.runtime.daemon import Daemon

    async def once() -> tuple[float, float, float, float]:
        daemon = Daemon(settings)
        try:
            c0, t0 = time.process_time(), time.perf_counter()
            await daemon.start()
            t1, c1 = time.perf_counter(), time.process_time()
            if daemon.barrier.sealed:
                raise BenchError(f"store did not unseal: {daemon.barrier.last_error}")
            c2, t2 = time.process_time(), time.perf_counter()
            await daemon.barrier.unseal()
            t3, c3 = time.perf_counter(), time.process_time()
        finally:
            await daemon.stop()
        return t1 - t0, c1 - c0, t3 - t2, c3 - c2

    await once()  # warms caches (and, for pkcs11, the module's first use); not counted
    samples = [await once() for _ in range(runs)]
    start_s, start_cpu = [s[0] for s in samples], sum(s[1] for s in samples)
    unseal_s, unseal_cpu = [s[2] for s in samples], sum(s[3] for s in samples)
    return Stat.of(start_s, start_cpu), Stat.of(unseal_s, unseal_cpu)


async def measure_rekey(settings: Settings, runs: int, warmup: int = 2) -> Stat:
    from secretsd.runtime.daemon import Daemon

    daemon = Daemon(settings)
    await daemon.start()
    try:
        if daemon.barrier.sealed:
            raise BenchError(f"store did not unseal: {daemon.barrier.last_error}")
        for _ in range(warmup):
            await daemon.barrier.rekey(reason="bench warm-up")
        samples: list[float] = []
        c0 = time.process_time()
        for _ in range(runs):
            t0 = time.perf_counter()
            await daemon.barrier.rekey(reason="bench")
            samples.append(time.perf_counter() - t0)
        cpu = time.process_time() - c0
    finally:
        await daemon.stop()
    return Stat.of(samples, cpu)


def timed(fn: Callable[[], object], runs: int, warmup: int = 20) -> Stat:
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    c0 = time.process_time()
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return Stat.of(samples, time.process_time() - c0)


def measure_wrap(provider: KeyProvider, runs: int) -> tuple[Stat, Stat]:
    key = secrets.token_bytes(32)
    wrapped = provider.wrap(key, AAD)
    if provider.unwrap(wrapped, AAD) != key:
        raise BenchError(f"{provider.name}: round trip returned a different key")
    return timed(lambda: provider.wrap(key, AAD), runs), timed(lambda: provider.unwrap(wrapped, AAD), runs)


def build_provider(spec: dict[str, Any], base_dir: Path) -> KeyProvider:
    from keyproviders import create_provider

    return create_provider(spec, base_dir=base_dir, create=True)


# -- the run ---------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    model = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    softhsm = subprocess.run(["softhsm2-util", "--version"], capture_output=True, text=True, check=False)
    from cryptography.hazmat.backends.openssl.backend import backend

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "hostname": platform.node(),
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python-pkcs11": version("python-pkcs11"),
        "cryptography": version("cryptography"),
        "openssl (cryptography)": backend.openssl_version_text(),
        "softhsm": softhsm.stdout.strip() or "unknown",
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


async def run(args: argparse.Namespace, work: Path, module: str) -> Report:
    from keyproviders.env_sealed import ARGON2_COST
    from keyproviders.pkcs11 import create_key

    terms_list: list[int] = args.terms
    report = Report(
        machine=machine_info(),
        settings={
            "terms": terms_list, "runs": args.runs, "rekey_runs": args.rekey_runs, "rekey_terms": args.rekey_terms,
            "wrap_runs": args.wrap_runs, "module": module, "cases": args.cases,
            "env_sealed_cost": {name: spec[0] for name, spec in ARGON2_COST.items()},
        },
    )
    for sub in ("stores", "configs", "keys"):
        (work / sub).mkdir(mode=0o700)
    all_cases = cases(module, work, args.cases)

    # One-off costs: the first PKCS#11 provider in the process loads the module (dlopen +
    # C_Initialize), logs in and finds the key; one Argon2id derivation at the default cost.
    t0 = time.perf_counter()
    for label, mechanism in ((KEK_GCM, "aes-gcm"), (KEK_KWP, "aes-key-wrap-pad")):
        create_key({"module": module, "token_label": TOKEN_LABEL, "key_label": label, "pin_env": PIN_ENV,
                    "mechanism": mechanism}, base_dir=work)
    report.one_off["pkcs11 module load + login + create 2 keys (first use in process)"] = (
        time.perf_counter() - t0) * 1e3
    derivations = []
    for _ in range(3):
        t0 = time.perf_counter()
        build_provider({"kind": "env-sealed", "passphrase_env": PASSPHRASE_ENV}, work).close()
        derivations.append(time.perf_counter() - t0)
    report.one_off["env-sealed provider construction = 1 Argon2id derivation (median of 3)"] = (
        statistics.median(derivations) * 1e3)

    for case in all_cases:
        for n in terms_list:
            log(f"unseal: {case.name}, {n} term(s)")
            settings = settings_for(work, case, f"t{n}")
            await build_store(settings, n)
            start, unseal = await measure_unseal(settings, args.runs)
            report.unseal.append(UnsealResult(case.name, n, await kek_ids(settings), start, unseal))
        log(f"rekey: {case.name}")
        settings = settings_for(work, case, "rekey")
        await build_store(settings, args.rekey_terms)
        report.rekey.append(RekeyResult(case.name, args.rekey_terms, await measure_rekey(settings, args.rekey_runs)))

    for case in all_cases:
        if len(case.specs) != 1:
            continue  # a combination is not one provider
        log(f"wrap/unwrap: {case.name}")
        provider = await asyncio.to_thread(build_provider, case.specs[0], work / "keys")
        try:
            wrap, unwrap = measure_wrap(provider, args.wrap_runs)
        finally:
            provider.close()
        report.wrap.append(WrapResult(case.name, wrap, unwrap))
    report.machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return report


# -- output ----------------------------------------------------------------------------------------
def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}x" if base else "-"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) for i, h in enumerate(header)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"]
    out.append("|" + "|".join(("-" * (w + 1) + ":") if i else "-" * (w + 2) for i, w in enumerate(widths)) + "|")
    out += [
        "| " + " | ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True)))
        + " |"
        for r in text
    ]
    return "\n".join(out)


def render(report: Report) -> str:
    m = report.machine
    parts = [
        f"date {m['date']}; {m['nproc']} CPU(s) {m['cpu']}; kernel {m['kernel']}; Python {m['python']}; "
        f"python-pkcs11 {m['python-pkcs11']}; SoftHSM {m['softhsm']}; cryptography {m['cryptography']} "
        f"({m['openssl (cryptography)']}); loadavg {m['loadavg_start']} -> {m.get('loadavg_end')}",
        "",
        "One-off costs (ms):",
        "",
        markdown_table(["what", "ms"], [[k, v] for k, v in report.one_off.items()]),
        "",
        "(a) Unseal: Daemon.start() on a fresh daemon, and Barrier.unseal() on a started one (ms; "
        "ratio = median / file's median at the same number of terms):",
        "",
    ]
    base_start = {u.terms: u.start.median_ms for u in report.unseal if u.case == BASELINE}
    base_unseal = {u.terms: u.unseal.median_ms for u in report.unseal if u.case == BASELINE}
    parts.append(markdown_table(
        ["provider", "terms", "KEK ids", "start p50", "start p95", "start cpu", "start vs file",
         "unseal p50", "unseal p95", "unseal cpu", "unseal vs file", "unseal µs/term"],
        [[u.case, u.terms, u.kek_ids, u.start.median_ms, u.start.p95_ms, u.start.cpu_ms,
          _ratio(u.start.median_ms, base_start.get(u.terms)), u.unseal.median_ms, u.unseal.p95_ms, u.unseal.cpu_ms,
          _ratio(u.unseal.median_ms, base_unseal.get(u.terms)), f"{u.unseal.median_ms / u.terms * 1e3:.0f}"]
         for u in report.unseal],
    ))
    base_rekey = next((r.rekey.median_ms for r in report.rekey if r.case == BASELINE), None)
    parts += ["", "(b) Rekey: Barrier.rekey() (= POST /v1/sys/keyring/rotate), ms:", "", markdown_table(
        ["provider", "runs", "p50", "p95", "max", "cpu/run", "p50 vs file"],
        [[r.case, r.rekey.n, r.rekey.median_ms, r.rekey.p95_ms, r.rekey.max_ms, r.rekey.cpu_ms,
          _ratio(r.rekey.median_ms, base_rekey)] for r in report.rekey],
    )]
    base_wrap = next((w for w in report.wrap if w.case == BASELINE), None)
    parts += ["", "(c) Raw provider calls on a 32-byte key, µs:", "", markdown_table(
        ["provider", "runs", "wrap p50", "wrap p95", "unwrap p50", "unwrap p95", "wrap vs file", "unwrap vs file"],
        [[w.case, w.wrap.n, w.wrap.median_ms * 1e3, w.wrap.p95_ms * 1e3, w.unwrap.median_ms * 1e3,
          w.unwrap.p95_ms * 1e3,
          _ratio(w.wrap.median_ms, base_wrap.wrap.median_ms if base_wrap else None),
          _ratio(w.unwrap.median_ms, base_wrap.unwrap.median_ms if base_wrap else None)] for w in report.wrap],
    )]
    return "\n".join(parts)


def int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("values must be positive integers")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--terms", type=int_list, default=[1, 10, 100], help="keyring sizes for (a), e.g. 1,10,100")
    parser.add_argument("--runs", type=int, default=10, help="unseal runs per (provider, terms) cell (default 10)")
    parser.add_argument("--rekey-runs", type=int, default=50, help="rekeys per provider (default 50)")
    parser.add_argument("--rekey-terms", type=int, default=10, help="keyring size before the rekeys (default 10)")
    parser.add_argument("--wrap-runs", type=int, default=500, help="raw wrap and unwrap calls per provider")
    parser.add_argument("--cases", default="pkcs11 aes-gcm,pkcs11 aes-key-wrap-pad,pkcs11 aes-gcm + file recovery,"
                        "file,env-sealed", help="comma-separated provider cases (default: all)")
    parser.add_argument("--module", help="path of libsofthsm2.so (default: the usual locations)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (prints its path)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the tables")
    parser.add_argument("--render", type=Path, metavar="FILE",
                        help="print the tables of a saved --json run; measure nothing")
    args = parser.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for name in ("runs", "rekey_runs", "rekey_terms", "wrap_runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        print(render(Report.from_dict(json.loads(args.render.read_text(encoding="utf-8")))))
        return 0
    work = Path(tempfile.mkdtemp(prefix="secretsd-bench-hsm-"))  # mode 0700
    # Before anything can load libsofthsm2: it reads SOFTHSM2_CONF once, in C_Initialize. The file
    # does not exist until the token is provisioned, so an early load fails instead of finding the
    # machine's tokens.
    os.environ["SOFTHSM2_CONF"] = str(work / "softhsm" / "softhsm2.conf")
    try:
        module = find_module(args.module)
        os.environ[PIN_ENV] = provision_token(work / "softhsm")
        os.environ[PASSPHRASE_ENV] = secrets.token_urlsafe(32)
        report: Report = asyncio.run(run(args, work, module))
    except BenchError as exc:
        log(f"bench/hsm.py: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(asdict(report), indent=1))
    else:
        print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
