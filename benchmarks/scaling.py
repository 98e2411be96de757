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
   the backward pass: the fused sum; `--overlap`: benchmarks/overlap.py) for 8-64 ranks at 10, 25 and 100 Gbit/s, with and without
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
from mpitrain.launcher.mpiexec import mpiexec_command  # noqa: E402

RATES = {"1gbit": 1e9, "10gbit": 10e9}


def load() -> float:
    return round(os.getloadavg()[0], 2)


def env(c: Cluster) -> dict:
    return c.env(PYTHONPATH=str(ROOT / "src"), MPITRAIN_TTY="0")


def probe(c: Cluster, n: int, sizes: list[int], repeats: int) -> list[dict]:
    cmd, _ = mpiexec_command(
        n,
        [
            sys.executable,
            str(ROOT / "benchmarks" / "allreduce_probe.py"),
            ",".join(map(str, sizes)),
            "--repeats",
            str(repeats),
        ],
        hostfile=str(c.hostfile(1, hosts=list(range(1, n + 1)))),
        iface="eth1",
    )
    proc = c.run(1, cmd, env=env(c), timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"probe failed: {proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def fit(rows: list[dict]) -> dict:
    """T = 2(n-1) a + 2(n-1)/n S / B from the median times: the latency a from the buffers of
    64 KB or less (where the bytes take microseconds), then 1/B by least squares of what is
    left over the buffers of 1 MB or more (the two terms are fitted apart: on a loaded
    machine a joint fit of both gave a negative latency)."""
    small = [r for r in rows if r["wire_bytes"] <= 65536]
    a = float(np.median([r["median"] / (2 * (r["ranks"] - 1)) for r in small]))
    big = [r for r in rows if r["wire_bytes"] >= 2**20]
    x = np.array([2 * (r["ranks"] - 1) / r["ranks"] * r["wire_bytes"] for r in big])
    y = np.array([r["median"] - 2 * (r["ranks"] - 1) * a for r in big])
    inv_b = float((x * y).sum() / (x * x).sum())
    pred = lambda r: 2 * (r["ranks"] - 1) * a + 2 * (r["ranks"] - 1) / r["ranks"] * r["wire_bytes"] * inv_b  # noqa: E731
    return {
        "latency_s": a,
        "bandwidth_Bps": 1 / inv_b,
        "rel_error_big": [round(float(pred(r) / r["median"] - 1), 3) for r in big],
    }


def op_seconds_per_byte() -> float:
    """mpitrain's bfloat16 sum (numpy) per byte of bfloat16 buffer on this machine (best of 5)."""
    from mpitrain.parallel.strategies.allreduce import bf16_add, to_bf16

    a = to_bf16(np.random.default_rng(0).standard_normal(2**20).astype(np.float32))
    best = float("inf")
    for _ in range(5):
        b = a[::-1].copy()
        t = time.perf_counter()
        bf16_add(a, b)
        best = min(best, time.perf_counter() - t)
    return best / (2 * a.size)


def bench(
    c: Cluster | None,
    n: int,
    model: str,
    image_size: int,
    compress: str = "none",
    steps: int = 30,
    threads: int | None = None,
) -> dict:
    args = [
        sys.executable,
        "-m",
        "mpitrain",
        "bench",
        "--model",
        model,
        "--image-size",
        str(image_size),
        "--json",
        "--steps",
        str(steps),
        "--warmup",
        "3",
        "--precision",
        "fp32",
        "--compress",
        compress,
    ]
    if threads:
        args += ["--threads", str(threads)]
    if c is None:
        proc = subprocess.run(
            args, capture_output=True, text=True, timeout=1800, env=dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        )
    else:
        cmd, _ = mpiexec_command(n, args, hostfile=str(c.hostfile(1, hosts=list(range(1, n + 1)))), iface="eth1")
        proc = c.run(1, cmd, env=env(c), timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"bench failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def conversion_seconds(params: int) -> float:
    """to_bf16 + from_bf16 of one gradient buffer on this machine (best of 5)."""
    from mpitrain.parallel.strategies.allreduce import from_bf16, to_bf16

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
    half = grad_bytes / 2
    # The ring's reduce-scatter applies the numpy sum to (n-1)/n of the buffer on every rank;
    # the 16-byte statistics and stop vote follow in a second allreduce (recursive doubling: log2 n steps);
    # the rounding before and the expansion after cost `conv`.
    return (
        2 * (n - 1) * a
        + 2 * (n - 1) / n * half / wire
        + (n - 1) / n * half * model["bf16_op_s_per_byte"]
        + 2 * math.ceil(math.log2(n)) * a
        + conv
    )


def model_of(out: dict) -> None:
    """The model's constants from the measurements: the latency of the float32 fits, the link
    efficiency (fitted bandwidth / nominal rate) of the 1 Gbit/s fit, where the link limits
    (at 10 Gbit/s these 2 shared cores limit TCP, not the link), and the numpy sum's cost."""
    fits = out["fits"]
    out["model"] = {
        "latency_s": float(np.median([fits[f"{r}/none"]["latency_s"] for r in RATES])),
        "link_efficiency": fits["1gbit/none"]["bandwidth_Bps"] * 8 / RATES["1gbit"],
        "bf16_op_s_per_byte": out["op_s_per_byte"],
    }


# A quiet cluster, assumed (not measured here): TCP over a dedicated Ethernet, 30 us per
# message step, 90 % of the line rate; the numpy sum and compute times as measured.
QUIET = {"latency_s": 30e-6, "link_efficiency": 0.9}


def predictions(out: dict) -> None:
    for key, model in (("predictions", out["model"]), ("predictions_quiet", dict(out["model"], **QUIET))):
        out[key] = []
        for name, m in out["models"].items():
            for compress in ("none", "bf16"):
                for gbit in (10, 25, 100):
                    for n in (8, 16, 32, 64):
                        t = predict(model, n, gbit * 1e9, compress, m["grad_bytes"], m["conversion_s"])
                        out[key].append(
                            {
                                "model": name,
                                "compress": compress,
                                "gbit": gbit,
                                "ranks": n,
                                "allreduce_s": t,
                                "efficiency": m["step_s"] / (m["step_s"] + t),
                            }
                        )
    for row in out.get("check", []):
        m = out["models"]["seed"]
        row["comm_s_predicted"] = predict(
            out["model"], row["ranks"], RATES[row["rate"]], row["compress"], m["grad_bytes"], m["conversion_s"]
        )


def tables(out: dict) -> str:
    """The figures of docs/scaling.md as markdown."""
    lines = [
        "| rate | ranks | buffer | float32 ms | bf16 ms | model float32 ms | model bf16 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    by = {(r["rate"], r["ranks"], r["bytes"], r["compress"]): r for r in out["probe"]}
    m = out["model"]
    for rate in RATES:
        for n in sorted({r["ranks"] for r in out["probe"]}):
            for size in out["sizes"]:
                f, b = by[(rate, n, size, "none")], by[(rate, n, size, "bf16")]
                measured_link = dict(m, link_efficiency=out["fits"][f"{rate}/none"]["bandwidth_Bps"] * 8 / RATES[rate])
                lines.append(
                    f"| {rate} | {n} | {size // 1024} KB | {1e3 * f['median']:.2f} | {1e3 * b['median']:.2f} | "
                    f"{1e3 * predict(measured_link, n, RATES[rate], 'none', size, 0):.2f} | "
                    f"{1e3 * predict(measured_link, n, RATES[rate], 'bf16', size, 0):.2f} |"
                )
    for key in ("predictions", "predictions_quiet"):
        lines += [
            "",
            f"{key}:",
            "",
            "| model | compress | Gbit/s | 8 | 16 | 32 | 64 |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name in out["models"]:
            for compress in ("none", "bf16"):
                for gbit in (10, 25, 100):
                    rows = [p for p in out[key] if (p["model"], p["compress"], p["gbit"]) == (name, compress, gbit)]
                    lines.append(
                        f"| {name} | {compress} | {gbit} | "
                        + " | ".join(f"{100 * p['efficiency']:.0f}% ({1e3 * p['allreduce_s']:.1f} ms)" for p in rows)
                        + " |"
                    )
    lines += [
        "",
        "| rate | ranks | compress | step ms | allreduce measured ms | model ms | load |",
        "| --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for c in out.get("check", []):
        lines.append(
            f"| {c['rate']} | {c['ranks']} | {c['compress']} | {1e3 * c['step_s']:.0f} | "
            f"{1e3 * c['comm_s_measured']:.1f} | {1e3 * c['comm_s_predicted']:.1f} | "
            f"{c['load'][0]}-{c['load'][1]} |"
        )
    return "\n".join(lines)


def refit(path: str) -> int:
    """Fit, predict and print the tables again from saved measurements (no cluster needed)."""
    out = json.loads(Path(path).read_text())
    for rate in RATES:
        for compress in ("none", "bf16"):
            out["fits"][f"{rate}/{compress}"] = fit(
                [r for r in out["probe"] if r["rate"] == rate and r["compress"] == compress]
            )
    out.setdefault("op_s_per_byte", op_seconds_per_byte())
    model_of(out)
    predictions(out)
    Path(path).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({"fits": out["fits"], "model": out["model"]}, indent=1))
    print(tables(out))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling.json"))
    p.add_argument("--ranks", default="2,3,4")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats (a smoke run)")
    p.add_argument("--refit", metavar="JSON", help="only fit, predict and print again from this file's measurements")
    args = p.parse_args()
    if args.refit:
        return refit(args.refit)
    why = unavailable()
    if why:
        raise SystemExit(f"scaling.py: {why}")
    ranks = [int(r) for r in args.ranks.split(",")]
    sizes = [2**k for k in ((14, 20, 22) if args.quick else (14, 16, 18, 20, 22, 24))]
    repeats = 3 if args.quick else 7
    out = {"machine": {"cores": os.cpu_count(), "load_start": load()}, "sizes": sizes, "probe": [], "fits": {}}

    with Cluster(max(ranks)) as c:
        for rate in RATES:
            c.limit(rate)
            for n in ranks:
                before = load()
                for row in probe(c, n, sizes, repeats):
                    row.update(
                        rate=rate,
                        median=float(np.median(row["seconds"])),
                        load=[before, load()],
                        wire_bytes=row["bytes"] // (2 if row["compress"] == "bf16" else 1),
                    )
                    out["probe"].append(row)
                    print(
                        f"{rate:7s} n={n} {row['compress']:4s} {row['bytes']:>9d} B  "
                        f"{1e3 * row['median']:8.2f} ms  (load {before})",
                        flush=True,
                    )
            c.limit(None)
        for rate in RATES:
            for compress in ("none", "bf16"):
                rows = [r for r in out["probe"] if r["rate"] == rate and r["compress"] == compress]
                out["fits"][f"{rate}/{compress}"] = fit(rows)
        out["op_s_per_byte"] = op_seconds_per_byte()
        model_of(out)

        from mpitrain.runtime import import_tensorflow

        import_tensorflow()
        from mpitrain.train.models import build_model

        out["models"] = {}
        for name, px in (("seed", 50), ("xray", 64)):
            params = sum(int(np.prod(v.shape)) for v in build_model(name, px, 2).trainable_variables)
            before = load()
            one = bench(None, 1, name, px, threads=2)
            out["models"][name] = {
                "image_size": px,
                "params": params,
                "grad_bytes": 4 * (params + 3),
                "step_s": one["seconds"] / one["steps"],
                "bench": one,
                "load": [before, load()],
                "conversion_s": conversion_seconds(params),
            }
            print(
                f"{name}: {params} parameters, {1e3 * out['models'][name]['step_s']:.1f} ms/step "
                f"(batch 64, 1 process x 2 threads, load {before})",
                flush=True,
            )

        predictions(out)

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
                    pred = predict(
                        out["model"],
                        n,
                        RATES[rate],
                        compress,
                        out["models"]["seed"]["grad_bytes"],
                        out["models"]["seed"]["conversion_s"],
                    )
                    out["check"].append(
                        {
                            "rate": rate,
                            "ranks": n,
                            "compress": compress,
                            "step_s": step,
                            "comm_s_measured": measured,
                            "comm_s_predicted": pred,
                            "load": [before, load()],
                        }
                    )
                    print(
                        f"check {rate} n={n} {compress}: step {1e3 * step:.0f} ms, allreduce measured "
                        f"{1e3 * measured:.1f} ms, predicted {1e3 * pred:.1f} ms (load {before})",
                        flush=True,
                    )
            c.limit(None)
    out["machine"]["load_end"] = load()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    predictions(out)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(tables(out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
