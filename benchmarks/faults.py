"""A fault campaign: short trainings, each with one random fault at a random moment (issue 24).

    python benchmarks/faults.py --trials 300 --seed 1 [--out DIR] [--json FILE]

Each trial draws a strategy (allreduce, local-sgd, master-worker), 2-4 ranks, a fault and
where it strikes, and runs `mpitrain train -n N` on a small synthetic data set with the fault
injected by tests/inject (on PYTHONPATH: the real launcher and ranks, nothing stubbed):

  kill / stop / pause / term / usr1 / raise  on one rank (pause: SIGSTOP, then SIGCONT after
      3, 10 or 40 s, under and over the watchdog's 20 s), in a phase: start (building the model),
      step (its k-th training step), validation (its k-th batch), checkpoint (inside its
      k-th checkpoint write, half written), final (saving the model);
  sigint  Ctrl-C to the launcher after a random delay.

Then it checks what mpitrain promises:
  ended    the job ended within its deadline (a hang is killed and counted);
  clean    no traceback reached the user;
  named    the message says what happened (lost rank, no progress, stopped on request,
           the exception, interrupted);
  resumes  `--resume` finishes the run (or, with no checkpoint yet, says so in one line);
  exact    the finished run's weights are exactly the uninterrupted run's (computed once
           per strategy and rank count): promised for every trial that resumes or finishes.

It prints one line per trial and a table of outcomes by fault and phase, with the worst
time to exit; --json writes every trial.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INJECT = ROOT / "tests" / "inject"
STRATEGIES = ("allreduce", "local-sgd", "master-worker")
KINDS = ("kill", "stop", "pause", "term", "usr1", "raise", "sigint")
PHASES = ("start", "step", "validation", "checkpoint", "final")
TRAIN = ["--model", "seed", "--image-size", "16", "--epochs", "2", "--batch-size", "4", "--threads", "1"]
TRAIN += ["--checkpoint-every", "3", "--timeout", "20"]
DEADLINE = 180.0  # seconds a faulty run may take before it counts as a hang
NAMES = {  # words the message must contain, per fault
    "kill": ("was lost",),
    "stop": ("no progress",),
    "pause": ("no progress",),  # a pause past --timeout 20; a shorter one must not stop the run
    "term": ("stopped on request",),
    "usr1": ("stopped on request",),
    "raise": ("injected failure",),
    "sigint": ("interrupt",),
}


def draw(rng: random.Random, i: int, most_ranks: int = 4) -> dict:
    kind = rng.choice(KINDS)
    trial = {
        "trial": i,
        "strategy": rng.choice(STRATEGIES),
        "ranks": rng.randint(2, most_ranks),
        "kind": kind,
    }
    if kind == "sigint":
        trial.update(phase="launcher", rank=None, at=round(rng.uniform(2.0, 30.0), 1))
    else:
        phase = rng.choice(PHASES)
        at = {"start": 1, "step": rng.randint(1, 12), "validation": rng.randint(1, 2), "checkpoint": rng.randint(1, 4)}
        rank = rng.randrange(trial["ranks"])
        if phase in ("checkpoint", "final"):
            rank = 0  # only rank 0 writes checkpoints and the model
        trial.update(phase=phase, rank=rank, at=at.get(phase, 1))
        if kind == "pause":
            trial["pause_s"] = rng.choice((3, 10, 40))  # under and over the --timeout of 20 s
    return trial


def _env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAULT", "SLOW_STEP", "SLURM_"))}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return dict(env, **(extra or {}))


def _run(argv: list[str], env: dict, sigint_after: float | None = None) -> dict:
    """Runs `argv` in a session of its own; kills it at the deadline (a hang)."""
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        if sigint_after is not None:
            try:
                proc.wait(sigint_after)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=DEADLINE)
        hung = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        hung = True
    return {"code": proc.returncode, "out": out, "err": err, "hung": hung, "seconds": time.monotonic() - started}


def train(n: int, strategy: str, data: Path, out: Path, env: dict, sigint_after=None) -> dict:
    argv = [sys.executable, "-m", "mpitrain", "train", "-n", str(n), "--strategy", strategy, "--data", str(data)]
    every = [] if strategy == "allreduce" else ["--sync-every", "3"]  # rounds mid-epoch too
    return _run([*argv, *TRAIN, *every, "--out", str(out)], env, sigint_after)


def resume(n: int, out: Path) -> dict:
    return _run([sys.executable, "-m", "mpitrain", "train", "-n", str(n), "--resume", "--out", str(out)], _env())


def checksum(run: Path) -> str | None:
    if not (run / "model.keras").exists():
        return None
    import keras
    import numpy as np

    weights = keras.saving.load_model(run / "model.keras", safe_mode=True).get_weights()
    return f"{zlib.crc32(b''.join(np.ascontiguousarray(w).tobytes() for w in weights)):08x}"


def trial_outcome(t: dict, data: Path, work: Path, references: dict) -> dict:
    from mpitrain.engine.checkpoint import list_checkpoints

    key = (t["strategy"], t["ranks"])
    if key not in references:
        folder = work / f"ref-{t['strategy']}-{t['ranks']}"  # kept: a later campaign in --out reuses it
        if not (folder / "model.keras").exists():
            shutil.rmtree(folder, ignore_errors=True)
            ref = train(t["ranks"], t["strategy"], data, folder, _env())
            if ref["code"] != 0:
                raise SystemExit(f"the uninterrupted {key} run failed: {ref['err'][-2000:]}")
        references[key] = checksum(folder)
    run = work / f"trial-{t['trial']:04d}"
    mark = run.with_suffix(".struck")  # the injector writes it when the fault strikes
    shutil.rmtree(run, ignore_errors=True)
    mark.unlink(missing_ok=True)
    fault = {}
    if t["kind"] != "sigint":
        fault = {"FAULT": t["kind"], "FAULT_PHASE": t["phase"], "FAULT_AT": str(t["at"]), "FAULT_RANK": str(t["rank"])}
        fault.update(FAULT_SECONDS=str(t.get("pause_s", 0)), FAULT_MARK=str(mark), PYTHONPATH=str(INJECT))
    first = train(t["ranks"], t["strategy"], data, run, _env(fault), t["at"] if t["kind"] == "sigint" else None)
    text = first["out"] + first["err"]
    result = dict(t, code=first["code"], seconds=round(first["seconds"], 1), ended=not first["hung"])
    result["clean"] = "Traceback" not in text
    finished = (run / "model.keras").exists()
    # A run the fault did not end (one that never struck, a short pause, a stop request in
    # the last epoch) needs no message; Ctrl-C struck if the launcher had not ended by then.
    ended_early = not (finished and first["code"] == 0)
    result["fired"] = mark.exists() if fault else ended_early
    mpitrain_lines = [line for line in first["err"].splitlines() if line.startswith("mpitrain:")]
    result["named"] = not ended_early or any(any(w in line for w in NAMES[t["kind"]]) for line in mpitrain_lines)
    result["message"] = next((line for line in reversed(mpitrain_lines) if "warning" not in line), "")[:300]
    if not finished and not first["hung"]:
        had_checkpoint = bool(list_checkpoints(run))
        resumed = resume(t["ranks"], run)
        if had_checkpoint:
            result["resumes"] = resumed["code"] == 0 and (run / "model.keras").exists()
        else:  # nothing to resume from: one line saying so, and no traceback
            said = [line for line in resumed["err"].splitlines() if line.startswith("mpitrain: error")]
            result["resumes"] = resumed["code"] != 0 and len(said) == 1 and "Traceback" not in resumed["err"]
            result["no_checkpoint"] = True
        result["clean"] = result["clean"] and "Traceback" not in resumed["out"] + resumed["err"]
        if not result["resumes"]:
            result["resume_error"] = resumed["err"][-500:]
    else:
        result["resumes"] = not first["hung"]
    got = checksum(run)
    result["exact"] = got == references[key] if got is not None else bool(result.get("no_checkpoint"))
    return result


def table(results: list[dict]) -> str:
    checks = ("ended", "clean", "named", "resumes", "exact")
    rows = defaultdict(list)
    for r in results:
        rows[(r["kind"], r["phase"])].append(r)
    head = "| fault | phase | trials | struck | " + " | ".join(checks) + " | worst exit (s) |"
    lines = [head, "|" + " --- |" * (len(checks) + 5)]
    for (kind, phase), rs in sorted(rows.items()):
        cells = [f"{sum(bool(r[c]) for r in rs)}/{len(rs)}" for c in checks]
        worst = max(r["seconds"] for r in rs)
        lines.append(
            f"| {kind} | {phase} | {len(rs)} | {sum(r['fired'] for r in rs)} | "
            + " | ".join(cells)
            + f" | {worst:.0f} |"
        )
    total = [f"{sum(bool(r[c]) for r in results)}/{len(results)}" for c in checks]
    struck = sum(r["fired"] for r in results)
    lines.append(
        f"| all | | {len(results)} | {struck} | " + " | ".join(total) + f" | {max(r['seconds'] for r in results):.0f} |"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--json", type=Path, default=None, help="write every trial's result here")
    ap.add_argument("--most-ranks", type=int, default=4, choices=(2, 3, 4), help="ranks are drawn from 2 to this")
    args = ap.parse_args(argv)
    from mpitrain.data.synth import generate

    work = args.out or Path(tempfile.mkdtemp(prefix="mpitrain-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not data.exists():
        generate(data, per_class=40, image_size=16, seed=1)
    rng = random.Random(args.seed)
    references: dict = {}
    results = []
    started = time.time()
    for i in range(args.trials):
        t = draw(rng, i, args.most_ranks)
        r = trial_outcome(t, data, work, references)
        results.append(r)
        bad = [c for c in ("ended", "clean", "named", "resumes", "exact") if not r[c]]
        where = f"{r['phase']}@{r['at']}" + (f" rank {r['rank']}" if r["rank"] is not None else "")
        print(
            f"trial {i:3d}: {r['strategy']:13s} x{r['ranks']} {r['kind']:6s} {where:22s} exit {r['code']:>4} "
            f"{r['seconds']:5.1f}s {'ok' if not bad else 'FAILED ' + ','.join(bad)}"
            + ("" if r["fired"] else " (fault never struck)"),
            flush=True,
        )
        if bad:
            print(f"    message: {r['message']}\n    {r.get('resume_error', '')}", flush=True)
    print(f"\n{args.trials} trials, seed {args.seed}, {time.time() - started:.0f} s\n")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    failed = [r for r in results if not all(r[c] for c in ("ended", "clean", "named", "resumes", "exact"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
