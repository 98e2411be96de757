"""mpitrain against its peers, in one go: `mpitrain bench -n N`, plain Keras `fit`, and
TensorFlow's MultiWorkerMirroredStrategy (MWMS) with `tf_keras`, alternating.

    python benchmarks/peers.py                         # -n 2, seed CNN, batch 32/rank, fp32 and bf16, 3 rounds
    python benchmarks/peers.py -n 2 --rounds 5 --steps 100 --precision fp32
    python benchmarks/peers.py --setup-only            # only create the peers' virtual environment
    python benchmarks/peers.py --try-horovod           # also try `pip install horovod` there once

Run it with the Python of mpitrain's environment (e.g. `.venv/bin/python`) from the
repository root: it times the mpitrain of this checkout (`src/` goes first on PYTHONPATH).

All of them train the same model (the registry's `seed` CNN, layer for layer: three conv/pool
blocks, dense 128, dropout 0.3, softmax in float32), the same batch per process, the same
precision (bf16 = Keras' `mixed_bfloat16`), Adam 1e-3, on random images in memory:

* `mpitrain bench -n N`: N ranks x (cores / N) threads, our loop and MPI allreduce;
* `mpitrain bench` in one process on every core ("mpitrain x1", for bf16 over fp32 on one rank);
* `keras fit`: one process, all cores, Keras 3's `model.fit` on float32 NumPy arrays;
* `MWMS xN`: N tf_keras workers x (cores / N) threads on localhost (TF_CONFIG with N local
  ports), `model.fit` on a `tf.data` pipeline of the global batch (N x batch), which the
  strategy splits into one batch per worker; gradients all-reduced by TensorFlow's
  collective ops over gRPC.

Each round runs every contestant once per precision, in a fixed order, so slow phases of a
shared machine spread over all of them; the table gives every round (with the load average
when it ended) and the median. Images/s: mpitrain and MWMS count every process's images;
`keras fit` its one process's.

The peers' environment (benchmarks/.venv-peers, made on first use, not a dependency of
mpitrain): a virtual environment whose .pth file puts this Python's site-packages on its
path, so it runs the very same TensorFlow build, plus `tf_keras` of the matching version
from PyPI (`pip install --no-deps tf_keras==<TF major.minor>.*`: its dependency on the
`tensorflow` package would pull a second copy where `tensorflow-cpu` is installed). Horovod
is not part of the comparison: see docs/benchmarks.md (`--try-horovod` records why).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS_VENV = HERE / ".venv-peers"


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _env(**extra) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", MPITRAIN_TTY="0", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src")] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


# ---- the peers' virtual environment ----


def peers_python() -> Path:
    return PEERS_VENV / "bin" / "python"


def setup_peers(quiet: bool = False) -> Path:
    """Create benchmarks/.venv-peers once: same TensorFlow (via a .pth), tf_keras from PyPI."""
    import tensorflow as tf

    py = peers_python()
    major_minor = ".".join(tf.__version__.split(".")[:2])
    if py.exists() and subprocess.run([py, "-c", "import tf_keras"], capture_output=True, env=_env()).returncode == 0:
        return py
    say = (lambda m: None) if quiet else (lambda m: print(m, flush=True))
    say(f"peers: creating {PEERS_VENV} (tf_keras {major_minor}.* for TensorFlow {tf.__version__})")
    subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "_mpitrain_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([py, "-m", "pip", "install", "--quiet", "--no-deps", f"tf_keras=={major_minor}.*"], check=True)
    return py


def try_horovod(timeout: float = 900) -> str:
    """`pip install horovod` (with TensorFlow) in the peers' environment, once; its outcome."""
    py = setup_peers()
    env = dict(os.environ, HOROVOD_WITH_TENSORFLOW="1", HOROVOD_WITHOUT_PYTORCH="1", HOROVOD_WITHOUT_MXNET="1")
    try:
        proc = subprocess.run(
            [py, "-m", "pip", "install", "--no-cache-dir", "horovod"],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        return f"exit {proc.returncode}\n{tail}"
    except subprocess.TimeoutExpired:
        return f"no result within {timeout:.0f} s"


# ---- workers (one process each) ----


def _seed_cnn(keras, image_size: int):
    """The registry's seed CNN (src/mpitrain/train/models.py), written for tf_keras."""
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((image_size, image_size, 1)),
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(64, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(64, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dropout(0.3),
            layers.Dense(2, activation="softmax", dtype="float32"),
        ]
    )


def _data(n: int, image_size: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    return (rng.random((n, image_size, image_size, 1), dtype=np.float32), rng.integers(0, 2, n).astype(np.int32))


def worker_fit(a) -> dict:
    """Plain Keras 3 `model.fit` in this process (mpitrain's environment)."""
    from mpitrain.runtime import configure_runtime, import_tensorflow

    import_tensorflow()
    configure_runtime(0, a.threads, 1, a.precision)
    import keras

    from mpitrain.train.models import build_model

    x, y = _data(a.batch_size * a.steps, a.image_size, 0)
    m = build_model("seed", a.image_size, 2)
    m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    m.fit(x[: a.batch_size * 5], y[: a.batch_size * 5], batch_size=a.batch_size, epochs=1, verbose=0, shuffle=False)
    t = time.perf_counter()
    m.fit(x, y, batch_size=a.batch_size, epochs=1, verbose=0, shuffle=False)
    seconds = time.perf_counter() - t
    return {"images_per_second": a.batch_size * a.steps / seconds, "policy": m.dtype_policy.name}


def worker_mwms(a) -> dict:
    """One MultiWorkerMirroredStrategy worker with tf_keras (the peers' environment).
    TF_CONFIG names this worker; the chief (index 0) reports."""
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(a.threads)
    tf.config.threading.set_inter_op_parallelism_threads(a.threads)
    import tf_keras as keras

    if a.precision == "bf16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    workers = strategy.num_replicas_in_sync
    global_batch = a.batch_size * workers
    x, y = _data(a.batch_size * a.steps, a.image_size, 0)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    ds = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .repeat()
        .batch(global_batch, drop_remainder=True)
        .prefetch(2)
        .with_options(options)
    )
    with strategy.scope():
        m = _seed_cnn(keras, a.image_size)
        m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    m.fit(ds, steps_per_epoch=5, epochs=1, verbose=0)  # warm-up: tracing, the first collectives
    t = time.perf_counter()
    m.fit(ds, steps_per_epoch=a.steps, epochs=1, verbose=0)
    seconds = time.perf_counter() - t
    return {
        "images_per_second": global_batch * a.steps / seconds,
        "workers": workers,
        "policy": m.layers[0].dtype_policy.name,
    }


# ---- the contestants ----


def _last_json(text: str) -> dict:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON result in:\n{text[-3000:]}")


def run_mpitrain(a, precision: str, one: bool = False) -> dict:
    """`mpitrain bench -n N` (N ranks x cores/N threads); `one`: one process on every core."""
    ranks = [] if one else ["-n", str(a.np)]
    cmd = [
        sys.executable,
        "-m",
        "mpitrain",
        "bench",
        *ranks,
        "--batch-size",
        str(a.batch_size),
        "--steps",
        str(a.steps),
        "--image-size",
        str(a.image_size),
        "--precision",
        precision,
        "--json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=a.timeout)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    r = _last_json(proc.stdout)
    return {
        "images_per_second": r["images_per_second"],
        "comm": r["comm_fraction"],
        "host": r.get("host_fraction"),
        "gflops": r.get("gflops_per_second"),
    }


def run_fit(a, precision: str) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "fit",
        "--threads",
        str(_cores()),
        "--batch-size",
        str(a.batch_size),
        "--steps",
        str(a.steps),
        "--image-size",
        str(a.image_size),
        "--precision",
        precision,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=a.timeout)
    if proc.returncode:
        raise RuntimeError(f"keras fit: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return _last_json(proc.stdout)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def run_mwms(a, precision: str) -> dict:
    py = setup_peers(quiet=True)
    workers = [f"localhost:{p}" for p in _free_ports(a.np)]
    threads = max(1, _cores() // a.np)
    procs = []
    for i in range(a.np):
        tf_config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})
        cmd = [
            str(py),
            str(Path(__file__).resolve()),
            "--worker",
            "mwms",
            "--threads",
            str(threads),
            "--batch-size",
            str(a.batch_size),
            "--steps",
            str(a.steps),
            "--image-size",
            str(a.image_size),
            "--precision",
            precision,
        ]
        procs.append(
            subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=_env(TF_CONFIG=tf_config, TF_USE_LEGACY_KERAS="1"),
            )
        )
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=a.timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_out, err) in zip(procs, outs):
        if p.returncode:
            raise RuntimeError(f"MWMS worker: exit {p.returncode}\n{err[-3000:]}")
    return _last_json(outs[0][0])


# ---- main ----


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--np", type=int, default=2, help="processes for mpitrain and MWMS (default: 2)")
    p.add_argument("--batch-size", type=int, default=32, help="per process (default: 32, train's default)")
    p.add_argument("--steps", type=int, default=60, help="timed steps per run (default: 60)")
    p.add_argument("--image-size", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default: 3)")
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--timeout", type=float, default=900, help="seconds per run before it counts as hung")
    p.add_argument("--setup-only", action="store_true", help="create benchmarks/.venv-peers and stop")
    p.add_argument("--try-horovod", action="store_true", help="try `pip install horovod` in the peers' venv once")
    p.add_argument("--worker", choices=["fit", "mwms"], help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        a.precision = a.precision[0]  # a worker runs one
        result = worker_fit(a) if a.worker == "fit" else worker_mwms(a)
        print(json.dumps(result), flush=True)
        return 0

    sys.path.insert(0, str(ROOT / "src"))
    from mpitrain.runtime import import_tensorflow

    tf = import_tensorflow()
    setup_peers()
    if a.try_horovod:
        print("peers: pip install horovod (HOROVOD_WITH_TENSORFLOW=1) in", PEERS_VENV, flush=True)
        print(try_horovod(), flush=True)
    if a.setup_only:
        return 0

    cores = _cores()
    print(
        f"peers: seed CNN {a.image_size}px, batch {a.batch_size} per process, {a.steps} steps, "
        f"{a.rounds} rounds; {cores} cores; TensorFlow {tf.__version__}",
        flush=True,
    )
    names = [f"mpitrain -n {a.np}", "keras fit x1", f"MWMS x{a.np}", "mpitrain x1"]
    runners = [run_mpitrain, run_fit, run_mwms, lambda a, pr: run_mpitrain(a, pr, one=True)]
    results = {(pr, n): [] for pr in a.precision for n in names}
    loads = {(pr, r): [] for pr in a.precision for r in range(a.rounds)}  # load average after each run
    for r in range(a.rounds):
        for pr in a.precision:
            for name, run in zip(names, runners):
                got = run(a, pr)
                results[(pr, name)].append(got["images_per_second"])
                loads[(pr, r)].append(_load())
                extra = "".join(f" {k} {v}" for k, v in got.items() if k != "images_per_second")
                print(
                    f"  round {r + 1} {pr:4s} {name:14s} {got['images_per_second']:8.1f} img/s (load {_load()}){extra}",
                    flush=True,
                )
    print()
    head = f"| precision | round | {' | '.join(names)} | mpitrain / fit | mpitrain / MWMS | load after each |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for pr in a.precision:
        rows = list(zip(*(results[(pr, n)] for n in names)))
        med = tuple(statistics.median(results[(pr, n)]) for n in names)
        for i, row in enumerate(rows + [med]):
            label = str(i + 1) if i < len(rows) else "median"
            load = " / ".join(loads[(pr, i)]) if i < len(rows) else ""
            print(
                f"| {pr} | {label} | "
                + " | ".join(f"{v:,.0f}" for v in row)
                + f" | {row[0] / row[1]:.2f} | {row[0] / row[2]:.2f} | {load} |"
            )
    if "fp32" in a.precision and "bf16" in a.precision:
        print("\nbf16 / fp32, by round and of the medians:")
        for n in names:
            ratios = [b / f for f, b in zip(results[("fp32", n)], results[("bf16", n)])]
            med = statistics.median(results[("bf16", n)]) / statistics.median(results[("fp32", n)])
            print(f"  {n:14s} " + " / ".join(f"{x:.2f}" for x in ratios) + f"   (medians: {med:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
