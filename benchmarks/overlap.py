"""ResNet-50 as Horovod's synthetic benchmark measures it, across 2 fake hosts: overlap,
compression and accumulation against the no-exchange ceiling (issue 23; as root, Linux):

    sudo .venv/bin/python benchmarks/overlap.py [--image-size 64] [--rates 1gbit,10gbit] \\
        [--out benchmarks/results/overlap.json]

For each link rate (tests/cluster.py: one rank and one TensorFlow thread per fake host, the
link limited with `tc tbf`) it runs `mpitrain bench -n 2 --model resnet50` (synthetic
images, batch 32 per rank, colour) as:

    none        no exchange at all (`--no-sync`): the ceiling
    fused       the gradient sum after backprop (`--overlap off`)
    overlap     the sum in buckets during backprop (`--overlap on`)
    overlap+bf16  the same, compressed (`--compress bf16`)
    accumulate4 --accumulate 4, one fused sum per 4 micro-batches
    ...and `--buckets 4,25,64` tries several bucket sizes for `overlap`.

and prints images/s (mean +- spread over --repeats timed runs) with the efficiency against
the ceiling, then the same ranks on one host (`--one-host`: shared memory, where overlap must
cost nothing). The load average is recorded before each run: the hosts share the machine's
cores, so take the figures on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

from cluster import Cluster, unavailable  # noqa: E402
from mpitrain.launcher.mpiexec import mpiexec_command  # noqa: E402

VARIANTS = {
    "none": ["--no-sync"],
    "fused": ["--overlap", "off"],
    "overlap": ["--overlap", "on"],
    "overlap+bf16": ["--overlap", "on", "--compress", "bf16"],
    "accumulate4": ["--overlap", "off", "--accumulate", "4"],
}


def load() -> float:
    return round(os.getloadavg()[0], 2)


def bench_args(a, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mpitrain",
        "bench",
        "--model",
        a.model,
        "--image-size",
        str(a.image_size),
        "--batch-size",
        str(a.batch),
        "--steps",
        str(a.steps),
        "--warmup",
        "2",
        "--repeats",
        str(a.repeats),
        "--threads",
        "1",
        "--precision",
        a.precision,
        "--json",
        *extra,
    ]


def run(c: Cluster | None, a, extra: list[str]) -> dict:
    argv = bench_args(a, extra)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), MPITRAIN_TTY="0")
    if c is None:  # both ranks on this host
        cmd, full = mpiexec_command(2, argv)
        proc = subprocess.run(cmd, env={**full, **env}, capture_output=True, text=True, timeout=3600)
    else:
        cmd, _ = mpiexec_command(2, argv, hostfile=str(c.hostfile(1, hosts=[1, 2])), iface="eth1")
        proc = c.run(1, cmd, env=c.env(PYTHONPATH=str(ROOT / "src"), MPITRAIN_TTY="0"), timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"bench failed: {' '.join(extra)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parameters(model: str, image_size: int) -> int:
    """Trainable parameters of the model as bench builds it (colour, 2 classes)."""
    from mpitrain.runtime import import_tensorflow

    import_tensorflow()
    from mpitrain.train.models import build_model, needs_channels

    m = build_model(model, image_size, 2, needs_channels(model) or 1)
    import math

    return sum(math.prod(v.shape) for v in m.trainable_variables)


def row(name: str, r: dict, ceiling: float | None, before: float) -> str:
    eff = f"{100 * r['images_per_second'] / ceiling:5.1f}%" if ceiling else "     -"
    return (
        f"{name:16s} {r['images_per_second']:8.2f} img/s (mean {r['images_per_second_mean']:.2f} "
        f"+- {r['images_per_second_spread']:.2f}) {eff}  step {r['seconds'] / r['steps']:.2f} s, "
        f"waited for the sum {100 * r['comm_fraction']:4.1f}%, summing {100 * r['summing_fraction']:4.1f}%, "
        f"{r['gflops_per_second']:.1f} GFLOP/s  (load {before})"
    )


def step_model(t_c: float, grad_bytes: float, n: int, gbit: float, compress: str, how: str, consts: dict) -> float:
    """Seconds of one optimizer step of n ranks (docs/scaling.md's ring model, `scaling.predict`):
    compute t_c (a third forward, two thirds backward: the 3x rule of `train/flops.py`) and
    the allreduce T. fused: t_c + T. overlap: the sum can hide behind the backward pass but
    its last bucket cannot start before backprop ends: t_c + max(T(last bucket), T - 2/3 t_c).
    accumulate4: 4 t_c + T per step (of 4 micro-batches), reported per micro-batch."""
    import math

    from scaling import predict

    conv = consts["conversion_s_per_byte"] * grad_bytes
    total = predict(consts, n, gbit * 1e9, compress, grad_bytes, conv)
    if how == "fused":
        return t_c + total
    if how == "accumulate4":
        return (4 * t_c + total) / 4
    buckets = max(1, math.ceil(grad_bytes / consts["bucket_bytes"]))
    last = predict(consts, n, gbit * 1e9, compress, grad_bytes / buckets, conv / buckets)
    return t_c + max(last, total - 2 * t_c / 3)


def predictions(path: str, scaling_json: str) -> int:
    """The scaling table of docs/scaling.md for the model measured in `path` (this script's
    JSON), with the quiet cluster's constants (scaling.QUIET and the quiet fit's bfloat16 sum)."""
    from scaling import QUIET

    out = json.loads(Path(path).read_text())
    fitted = json.loads(Path(scaling_json).read_text())
    quiet = fitted["model"]
    seed = fitted["models"]["seed"]  # to_bf16 + from_bf16 measured there, per gradient byte
    per_byte = seed["conversion_s"] / seed["grad_bytes"]
    ceiling = next(r["result"] for r in out["runs"] if r["variant"] == "none")
    t_c = ceiling["seconds"] / ceiling["steps"]
    grad_bytes = 4 * out["params"]
    consts = dict(quiet, **QUIET, bucket_bytes=8e6, conversion_s_per_byte=per_byte)
    print(
        f"{out['args']['model']} {out['args']['image_size']} px: {out['params'] / 1e6:.1f} M parameters, "
        f"step {t_c:.2f} s (batch {out['args']['batch']}, 1 thread, the ceiling run)"
    )
    # The check: the fake hosts' own constants (this machine's TCP) against the measured runs.
    here = dict(quiet, bucket_bytes=8e6, conversion_s_per_byte=per_byte)
    names = {"fused": ("fused", "none"), "overlap": ("overlap", "none"), "overlap+bf16": ("overlap", "bf16")}
    names["accumulate4"] = ("accumulate4", "none")
    for r in out["runs"]:
        if r["rate"] == "1gbit" and r["variant"].split(" ")[0] in names:
            how, compress = names[r["variant"].split(" ")[0]]
            bucket = dict(here, bucket_bytes=(r["result"]["bucket_mb"] or 8) * 1e6)  # the run's own
            model = 100 * t_c / step_model(t_c, grad_bytes, 2, 1, compress, how, bucket)
            measured = 100 * r["result"]["images_per_second"] / ceiling["images_per_second"]
            print(f"check, 2 fake hosts at 1 Gbit/s, {r['variant']}: measured {measured:.0f}%, model {model:.0f}%")
    # The measured step is one slow thread's; a node of many cores or a GPU steps far faster,
    # and hides less: the same model for steps of 0.5 s and 0.1 s.
    for step in (t_c, 0.5, 0.1):
        print(f"\nstep {step:.2f} s:\n")
        print("| scheme | Gbit/s | 8 | 16 | 32 | 64 |")
        print("| --- | --- | ---: | ---: | ---: | ---: |")
        for how, compress in (("fused", "none"), ("overlap", "none"), ("overlap", "bf16"), ("accumulate4", "none")):
            for gbit in (1, 10, 25, 100):
                ns = (8, 16, 32, 64)
                cells = [100 * step / step_model(step, grad_bytes, n, gbit, compress, how, consts) for n in ns]
                name = how + (" + bf16" if compress == "bf16" else "")
                print(f"| {name} | {gbit} | " + " | ".join(f"{e:.0f}%" for e in cells) + " |")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--rates", default="1gbit")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--buckets", default="", help="also try these --bucket-mb for overlap, e.g. 4,64")
    p.add_argument("--one-host", action="store_true", help="also fused and overlap with both ranks on this host")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "overlap.json"))
    p.add_argument("--predict", metavar="JSON", help="only print the scaling table from this file's runs")
    p.add_argument("--scaling", default=str(ROOT / "benchmarks" / "results" / "scaling-quiet.json"))
    a = p.parse_args()
    if a.predict:
        return predictions(a.predict, a.scaling)
    why = unavailable()
    if why:
        raise SystemExit(f"overlap.py: {why}")
    out: dict = {"args": vars(a), "cores": os.cpu_count(), "runs": [], "params": parameters(a.model, a.image_size)}
    variants = {k: VARIANTS[k] for k in a.variants.split(",")}
    for mb in filter(None, a.buckets.split(",")):
        variants[f"overlap {mb} MB"] = ["--overlap", "on", "--bucket-mb", mb]
    with Cluster(2) as c:
        for rate in a.rates.split(","):
            c.limit(rate)
            ceiling = None
            print(f"{a.model} {a.image_size} px, batch {a.batch}/rank, {a.precision}, 2 fake hosts at {rate}:")
            for name, extra in variants.items():
                before = load()
                r = run(c, a, extra)
                ceiling = r["images_per_second"] if name == "none" else ceiling
                out["runs"].append({"rate": rate, "variant": name, "load": before, "result": r})
                print("  " + row(name, r, ceiling, before), flush=True)
            c.limit(None)
    if a.one_host:
        print(f"{a.model}: 2 ranks on one host (shared memory):")
        for name in ("fused", "overlap"):
            before = load()
            r = run(None, a, VARIANTS[name])
            out["runs"].append({"rate": "one host", "variant": name, "load": before, "result": r})
            print("  " + row(name, r, None, before), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
