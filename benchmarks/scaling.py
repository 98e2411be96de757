"""The scaling model of docs/scaling.md, measured again with one command (as root, Linux):

    sudo .venv/bin/python benchmarks/scaling.py [--out benchmarks/results/scaling.json] [--quick]

1. Fake hosts (tests/cluster.py: network namespaces on a bridge, one rank per host), links
   limited with `tc tbf` to each rate; mpitrain's allreduce (benchmarks/allreduce_probe.py)
   timed against buffer size and rank count, float32 (`--compress none`) and bfloat16
   (`--compress bf16`).
2. Fit per rate: ring allreduce, T(n, S) = 2(n-1) a + 2(n-1)/n S / B  (latency a per step,
   bandwidth B; each rank sends and receives 2(n-1)/n of the buffer).
3. The step compute time of the seed CNN and the X-ray model (`mpitrain bench`, one process).
4. Predicted scaling efficiency E = t_step / (t_step + T(n, S_grad)) (mpitrain reduces after
   the backward pass: no overlap) for 8-64 ranks at 10, 25 and 100 Gbit/s, with and without
   compression.
5. The check: `mpitrain bench -n 2 / -n 4` across fake hosts at 1 and 10 Gbit/s, measured
   communication time per step against the model's prediction.

The machine's load average is recorded before and after every part: other work shares the
cores, so the figures are for this machine in that state.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

from cluster import Cluster, unavailable  # noqa: E402

from mpitrain.dist.launch import mpiexec_command  # noqa: E402

RATES = {"1gbit": 1e9, "10gbit": 10e9}


def load() -> float:
    return round(os.getloadavg()[0], 2)


def env(c: Cluster) -> dict:
    return c.env(PYTHONPATH=str(ROOT / "src"), MPITRAIN_TTY="0")


def probe(c: Cluster, n: int, sizes: list[int], repeats: int) -> list[dict]:
    cmd, _ = mpiexec_command(n, [sys.executable, str(ROOT / "benchmarks" / "allreduce_probe.py"),
                                 ",".join(map(str, sizes)), "--repeats", str(repeats)],
                             hostfile=str(c.hostfile(1, hosts=list(range(1, n + 1)))), iface="eth1")
    proc = c.run(1, cmd, env=env(c), timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"probe failed: {proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def fit(rows: list[dict]) -> dict:
    """Least squares of the median times: T = 2(n-1) a + 2(n-1)/n S / B."""
    A = np.array([[2 * (r["ranks"] - 1), 2 * (r["ranks"] - 1) / r["ranks"] * r["wire_bytes"]] for r in rows])
    t = np.array([r["median"] for r in rows])
    # Relative errors matter (sizes span 3 decades): weight each row by 1/t.
    (a, inv_b), *_ = np.linalg.lstsq(A / t[:, None], np.ones_like(t), rcond=None)
    pred = A @ np.array([a, inv_b])
    return {"latency_s": float(a), "bandwidth_Bps": float(1 / inv_b) if inv_b > 0 else float("inf"),
            "max_rel_error": float(np.max(np.abs(pred - t) / t))}


def bench(c: Cluster | None, n: int, model: str, image_size: int, compress: str = "none", steps: int = 30,
          threads: int | None = None) -> dict:
    args = [sys.executable, "-m", "mpitrain", "bench", "--model", model, "--image-size", str(image_size),
            "--json", "--steps", str(steps), "--warmup", "3", "--precision", "fp32", "--compress", compress]
    if threads:
        args += ["--threads", str(threads)]
    if c is None:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=1800,
                              env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    else:
        cmd, _ = mpiexec_command(n, args, hostfile=str(c.hostfile(1, hosts=list(range(1, n + 1)))), iface="eth1")
        proc = c.run(1, cmd, env=env(c), timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"bench failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def conversion_seconds(params: int) -> float:
    """to_bf16 + from_bf16 of one gradient buffer on this machine (best of 5)."""
    from mpitrain.dist.strategies.allreduce import from_bf16, to_bf16

    g = np.random.default_rng(0).standard_normal(params).astype(np.float32)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        from_bf16(to_bf16(g))
        best = min(best, time.perf_counter() - t)
    return best


def predict(model: dict, n: int, rate: float, compress: str, grad_bytes: int, conv: float) -> float:
    """Seconds of one step's allreduce on n ranks at `rate` bit/s."""
    a, eff = model["latency_s"], model["link_efficiency"]
    wire = rate / 8 * eff
    if compress == "none":
        return 2 * (n - 1) * a + 2 * (n - 1) / n * grad_bytes / wire
    per_byte = 1 / wire + model["bf16_op_s_per_byte"]
    stats = 2 * math.ceil(math.log2(n)) * a  # the 12-byte statistics: recursive doubling
    return 2 * (n - 1) * a + 2 * (n - 1) / n * (grad_bytes / 2) * per_byte + stats + conv


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling.json"))
    p.add_argument("--ranks", default="2,3,4")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats (a smoke run)")
    args = p.parse_args()
    why = unavailable()
    if why:
        raise SystemExit(f"scaling.py: {why}")
    ranks = [int(r) for r in args.ranks.split(",")]
    sizes = [2 ** k for k in ((14, 20, 22) if args.quick else (14, 16, 18, 20, 22, 24))]
    repeats = 3 if args.quick else 7
    out = {"machine": {"cores": os.cpu_count(), "load_start": load()}, "sizes": sizes, "probe": [], "fits": {}}

    with Cluster(max(ranks)) as c:
        for rate in RATES:
            c.limit(rate)
            for n in ranks:
                before = load()
                for row in probe(c, n, sizes, repeats):
                    row.update(rate=rate, median=float(np.median(row["seconds"])), load=[before, load()],
                               wire_bytes=row["bytes"] // (2 if row["compress"] == "bf16" else 1))
                    out["probe"].append(row)
                    print(f"{rate:7s} n={n} {row['compress']:4s} {row['bytes']:>9d} B  "
                          f"{1e3 * row['median']:8.2f} ms  (load {before})", flush=True)
            c.limit(None)
        for rate in RATES:
            for compress in ("none", "bf16"):
                rows = [r for r in out["probe"] if r["rate"] == rate and r["compress"] == compress]
                out["fits"][f"{rate}/{compress}"] = fit(rows)
        # The model: latency from the float32 fits; link efficiency = fitted bandwidth / nominal
        # rate; the bf16 operation's own cost per byte = the extra time per byte over the float32
        # wire time at the same rate (numpy, not the link: it does not shrink at faster rates).
        fits = out["fits"]
        lat = float(np.median([fits[f"{r}/none"]["latency_s"] for r in RATES]))
        eff = float(np.median([fits[f"{r}/none"]["bandwidth_Bps"] * 8 / RATES[r] for r in RATES]))
        extra = float(np.median([max(0.0, 1 / fits[f"{r}/bf16"]["bandwidth_Bps"] - 1 / fits[f"{r}/none"]["bandwidth_Bps"])
                                 for r in RATES]))
        out["model"] = {"latency_s": lat, "link_efficiency": eff, "bf16_op_s_per_byte": extra}

        from mpitrain.runtime import import_tensorflow

        import_tensorflow()
        from mpitrain.train.models import build_model

        out["models"] = {}
        for name, px in (("seed", 50), ("xray", 64)):
            params = sum(int(np.prod(v.shape)) for v in build_model(name, px, 2).trainable_variables)
            before = load()
            one = bench(None, 1, name, px, threads=2)
            out["models"][name] = {"image_size": px, "params": params, "grad_bytes": 4 * (params + 3),
                                   "step_s": one["seconds"] / one["steps"], "bench": one, "load": [before, load()],
                                   "conversion_s": conversion_seconds(params)}
            print(f"{name}: {params} parameters, {1e3 * out['models'][name]['step_s']:.1f} ms/step "
                  f"(batch 64, 1 process x 2 threads, load {before})", flush=True)

        out["predictions"] = []
        for name, m in out["models"].items():
            for compress in ("none", "bf16"):
                for gbit in (10, 25, 100):
                    for n in (8, 16, 32, 64):
                        t = predict(out["model"], n, gbit * 1e9, compress, m["grad_bytes"], m["conversion_s"])
                        out["predictions"].append({"model": name, "compress": compress, "gbit": gbit, "ranks": n,
                                                   "allreduce_s": t, "efficiency": m["step_s"] / (m["step_s"] + t)})

        # The check: real training steps across fake hosts at the measured rates.
        out["check"] = []
        for rate in RATES:
            c.limit(rate)
            for n in (2, 4):
                if n > max(ranks):
                    continue
                for compress in ("none", "bf16"):
                    before = load()
                    r = bench(c, n, "seed", 50, compress, steps=20, threads=1)
                    step = r["seconds"] / r["steps"]
                    measured = r["comm_fraction"] * step
                    pred = predict(out["model"], n, RATES[rate], compress, out["models"]["seed"]["grad_bytes"],
                                   out["models"]["seed"]["conversion_s"])
                    out["check"].append({"rate": rate, "ranks": n, "compress": compress, "step_s": step,
                                         "comm_s_measured": measured, "comm_s_predicted": pred,
                                         "load": [before, load()]})
                    print(f"check {rate} n={n} {compress}: step {1e3 * step:.0f} ms, allreduce measured "
                          f"{1e3 * measured:.1f} ms, predicted {1e3 * pred:.1f} ms (load {before})", flush=True)
            c.limit(None)
    out["machine"]["load_end"] = load()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
