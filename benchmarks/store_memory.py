"""Peak memory per rank of `mpitrain train` with --store memory or disk (docs/benchmarks.md).

Runs one training and samples every rank's /proc/PID/status and smaps_rollup twice a
second: the peak private memory (RssAnon), the peak resident set (VmHWM, which counts the
store's pages a rank has mapped: shared, in the page cache), the host's peak total of the
ranks' proportional set (Pss: a shared page counted once over the ranks), the store's size
on disk, and the run's images/s.

    python benchmarks/store_memory.py DATA --ranks 2 --store disk --image-size 128 --cache-dir /work/bench-store/cache
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _kb(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _ranks(root: int) -> list[int]:
    """The processes below `root` that are MPI ranks (OMPI_COMM_WORLD_RANK in their environment)."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        todo += [int(k) for k in kids]
        if b"OMPI_COMM_WORLD_RANK=" in env:
            found.append(pid)
    return found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--store", default="disk")
    ap.add_argument("--image-size", default="128")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--epochs", default="1")
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--extra", default="", help="more train options, one string")
    ap.add_argument(
        "--sample-seconds",
        type=float,
        default=None,
        help="stop the job (Ctrl-C) this long after its 'loaded' line: memory only, no images/s",
    )
    a = ap.parse_args()
    Path(a.cache_dir).mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="store-bench-", dir=a.cache_dir)) / "run"
    cmd = [sys.executable, "-m", "mpitrain", "train", *(["-n", str(a.ranks)] if a.ranks > 1 else [])]
    cmd += ["--data", a.data, "--model", a.model, "--image-size", a.image_size, "--epochs", a.epochs]
    cmd += ["--store", a.store, "--cache-dir", a.cache_dir, "--out", str(out), *a.extra.split()]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    said: list[str] = []
    loaded: list[float] = []

    def read() -> None:  # in a thread: a full pipe would stop the job
        assert proc.stdout is not None
        for line in proc.stdout:
            said.append(line)
            if line.startswith("loaded"):
                loaded.append(time.time())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peak: dict[int, dict[str, int]] = {}
    host_pss = host_anon = 0
    while proc.poll() is None:
        pids = _ranks(proc.pid) if a.ranks > 1 else [proc.pid]
        pss = anon = 0
        for pid in pids:
            seen = peak.setdefault(pid, {"RssAnon": 0, "VmHWM": 0, "Pss": 0})
            now = {
                "RssAnon": _kb(f"/proc/{pid}/status", "RssAnon"),
                "VmHWM": _kb(f"/proc/{pid}/status", "VmHWM"),
                "Pss": _kb(f"/proc/{pid}/smaps_rollup", "Pss"),
            }
            for k, v in now.items():
                seen[k] = max(seen[k], v)
            pss, anon = pss + now["Pss"], anon + now["RssAnon"]
        host_pss, host_anon = max(host_pss, pss), max(host_anon, anon)
        if a.sample_seconds is not None and loaded and time.time() > loaded[0] + a.sample_seconds:
            proc.send_signal(signal.SIGINT)  # the launcher stops its ranks, as Ctrl-C does
            proc.wait()
            break
        time.sleep(0.5)
    reader.join()
    log = "".join(said)
    if proc.returncode != 0 and a.sample_seconds is None:
        print(log, file=sys.stderr)
        raise SystemExit(f"training failed ({proc.returncode})")
    # This run's stores: the paths its "store:" line names (the folder may hold others).
    named = {w for line in log.splitlines() if line.startswith("store:") for w in line.split() if w.endswith(".npy")}
    size = sum(Path(p).stat().st_size for p in named)
    runtime = json.loads((out / "config.json").read_text())["runtime"] if (out / "config.json").exists() else {}
    gb = 2**20  # kB -> GB
    result = {
        "data": a.data,
        "ranks": a.ranks,
        "store": a.store,
        "image_size": a.image_size,
        "peak_rss_anon_gb_per_rank": [round(p["RssAnon"] / gb, 3) for p in peak.values()],
        "peak_vmhwm_gb_per_rank": [round(p["VmHWM"] / gb, 3) for p in peak.values()],
        "host_peak_pss_gb": round(host_pss / gb, 3),
        "host_peak_rss_anon_gb": round(host_anon / gb, 3),
        "store_gb": round(size / 1e9, 3),
        "images_per_second": runtime.get("images_per_second"),
        "wall_seconds": round(time.time() - t0, 1),
        "lines": [line for line in log.splitlines() if line.startswith(("store:", "loaded", "images:", "time:"))],
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
