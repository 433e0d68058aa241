#!/usr/bin/env python3
"""Backup and restore of a store of N secrets: wall time and peak RSS of each command.

Run by hand::

    python bench/backup.py --secrets 10000 100000

For each N: a throw-away daemon (``bench/load.py``'s helpers: audit on, SQLite, file key provider)
is filled with N secrets through ``secretsd import-env`` (40-byte values, batches of 1,000), then
stopped; then ``secretsd backup create``, ``backup verify`` and ``backup restore`` (into an empty
data directory holding the same key file) each run as a child process, timed, with its peak RSS
from ``wait4``. Memory must stay flat in N (the file is written and read as a stream): compare the
RSS columns of the two sizes. The restored store's row count is checked against the manifest.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import load  # bench/load.py: this script's directory is first on sys.path

TIME = shutil.which("time", path="/usr/bin:/bin") or "/usr/bin/time"  # GNU time (apt: time)


def _measure(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(seconds, peak RSS in MiB, stdout) of one child process.

    The peak comes from GNU time's ``%M``: the child is forked from ``time``, not from this process,
    whose own resident set (the fill's data) a forked child would count as its own high-water mark.
    """
    with tempfile.NamedTemporaryFile(mode="r") as rss:
        began = time.perf_counter()
        done = subprocess.run([TIME, "-f", "%M", "-o", rss.name, *cmd], capture_output=True, text=True, env=env,
                              timeout=3600, check=False)
        took = time.perf_counter() - began
        if done.returncode != 0:
            raise load.BenchError(f"{' '.join(cmd[-5:])} failed ({done.returncode}): {done.stderr.strip()}")
        return took, int(rss.read().split()[-1]) / 1024, done.stdout


def _fill(count: int, tmp: Path) -> tuple[Path, str]:
    """A stopped daemon's data directory holding ``count`` secrets; (its data dir, admin token)."""
    workdir = tmp / f"store-{count}"
    workdir.mkdir()
    daemon = load.Daemon(workdir, load.free_port())
    daemon.init()
    daemon.start()
    try:
        env = load.daemon_env() | {"SECRETSD_ADDR": daemon.base_url, "SECRETSD_TOKEN": daemon.token}
        dotenv = tmp / f"fill-{count}.env"
        dotenv.write_text("".join(f"KEY_{i:07d}={secrets.token_hex(20)}\n" for i in range(count)))
        done = subprocess.run([*load.secretsd_command(), "import-env", str(dotenv), "--prefix", "bench/app",
                               "--json"], capture_output=True, text=True, env=env, timeout=3600, check=False)
        if done.returncode != 0 or json.loads(done.stdout)["summary"]["written"] != count:
            raise load.BenchError(f"filling the store failed: {done.stderr.strip()}")
    finally:
        daemon.stop()
    return daemon.data_dir, daemon.token


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--secrets", type=load.positive_int, nargs="+", default=[10_000, 100_000])
    args = parser.parse_args()
    cli = load.secretsd_command()
    env = load.daemon_env()
    rows = []
    with tempfile.TemporaryDirectory(prefix="secretsd-bench-backup-") as name:
        tmp = Path(name)
        for count in args.secrets:
            began = time.perf_counter()
            data, _token = _fill(count, tmp)
            print(f"filled {count} secrets in {time.perf_counter() - began:.1f} s", flush=True)
            out = tmp / f"b-{count}.sdbk"
            c_s, c_rss, made = _measure([*cli, "backup", "create", "--out", str(out), "--data-dir", str(data),
                                         "--json"], env)
            manifest = json.loads(made)
            v_s, v_rss, _ = _measure([*cli, "backup", "verify", str(out), "--data-dir", str(data)], env)
            target = tmp / f"restored-{count}"
            target.mkdir(mode=0o700)
            shutil.copy2(data / "master.key", target / "master.key")
            r_s, r_rss, restored = _measure([*cli, "backup", "restore", str(out), "--data-dir", str(target),
                                             "--json"], env)
            report = json.loads(restored)
            if not report["ok"] or report["sections"] != manifest["sections"]:
                raise load.BenchError("the restore does not match the backup")
            rows.append((count, out.stat().st_size / 2**20, c_s, c_rss, v_s, v_rss, r_s, r_rss))
            print(f"{count}: create {c_s:.1f} s {c_rss:.0f} MiB, verify {v_s:.1f} s {v_rss:.0f} MiB, "
                  f"restore {r_s:.1f} s {r_rss:.0f} MiB, file {rows[-1][1]:.1f} MiB", flush=True)
    print(f"# python bench/backup.py --secrets {' '.join(map(str, args.secrets))}  ({os.cpu_count()} CPUs)")
    print("| secrets | file MiB | create s | create RSS MiB | verify s | verify RSS MiB | restore s | "
          "restore RSS MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]:,} | {r[1]:.1f} | {r[2]:.1f} | {r[3]:.0f} | {r[4]:.1f} | {r[5]:.0f} | {r[6]:.1f} "
              f"| {r[7]:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
