"""Evaluation jobs started together on one GPU, cold caches, with and without the first-compile lock.

Each mode (QUAMBA_COMPILE_LOCK=0, then 1) starts N processes at once on fresh, empty inductor and
Triton cache dirs that its N processes share (as the jobs of one machine do), removed afterwards.
Each process is an evaluation job's model side: `QuambaLM(dir, device=...)` (quamba.load), then
`_loglikelihood_tokens` on synthetic requests of --tokens tokens, whose first batch compiles and
autotunes the kernels (under the lock in mode `on`). It reports its load time, first batch (lock
wait included), and when its first batch ended and it finished, counted from the launch. Each
mode's result is a JSON line on stderr as soon as it is known; a markdown table ends the run.
An untimed warm-up process (on caches of its own, thrown away) runs first, so that the first timed
mode does not alone pay the cold page cache and Python's bytecode compilation; --repeats R runs
the modes R times, the order reversed every other time.

    python -m bench.compile_lock MODEL_DIR --processes 3 --tokens 512
    python -m bench.compile_lock /tmp/rsq/w8a8 --processes 2 --tokens 64 --device cpu   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {"off": "0", "on": "1"}
CONTINUATION = 8  # tokens scored per request; the rest of --tokens is its context


def child(model_dir: str, launched: float, batch_size: int, tokens: int, requests: int, device: str) -> dict:
    """One evaluation job's model work in this process; times in s, `*_at` counted from `launched`."""
    import random

    import torch

    from quamba.lm_eval_model import QuambaLM

    begun = time.perf_counter()
    lm = QuambaLM(model_dir, batch_size=batch_size, device=device, progress=False)
    load_s = time.perf_counter() - begun
    rng = random.Random(0)  # the same requests in every process, as jobs of one task would score
    rows = [[rng.randrange(lm.vocab_size) for _ in range(tokens)] for _ in range(requests)]
    lm._loglikelihood_tokens([(None, row[:-CONTINUATION], row[-CONTINUATION:]) for row in rows])
    done_at = time.time() - launched
    return {"pid": os.getpid(), "device": torch.cuda.get_device_name() if lm.device.type == "cuda" else "cpu",
            "load_s": round(load_s, 2), "first_batch_s": round(lm.first_batch_seconds, 2),
            "first_batch_end_at": round(done_at - (lm.scoring_seconds - lm.first_batch_seconds), 2),
            "scoring_s": round(lm.scoring_seconds, 2), "done_at": round(done_at, 2)}


def run_mode(mode: str, args: argparse.Namespace, processes: int | None = None) -> dict:
    """N processes of one mode launched together on fresh shared caches; their reports and the wall time."""
    processes = processes or args.processes
    with tempfile.TemporaryDirectory(prefix=f"compile-lock-{mode}-") as tmp:
        env = {**os.environ, "QUAMBA_COMPILE_LOCK": MODES[mode], "TORCHINDUCTOR_CACHE_DIR": f"{tmp}/inductor",
               "TRITON_CACHE_DIR": f"{tmp}/triton"}
        launched = time.time()
        procs = []
        for i in range(processes):
            with open(f"{tmp}/out{i}", "w") as out, open(f"{tmp}/err{i}", "w") as err:  # the child keeps its copies
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "bench.compile_lock", args.model_dir, "--child", str(launched),
                     "--batch-size", str(args.batch_size), "--tokens", str(args.tokens),
                     "--requests", str(args.requests), "--device", args.device], env=env, stdout=out, stderr=err))
        deadline = time.monotonic() + args.timeout
        for proc in procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                for other in procs:
                    other.kill()
                raise SystemExit(f"mode {mode}: the processes ran past --timeout {args.timeout:g} s")
        wall = time.time() - launched
        reports = []
        for i, proc in enumerate(procs):
            if proc.returncode != 0:
                tail = Path(f"{tmp}/err{i}").read_text()[-3000:]
                raise SystemExit(f"mode {mode}: process {i} failed (exit {proc.returncode}):\n{tail}")
            reports.append(json.loads(Path(f"{tmp}/out{i}").read_text().strip().splitlines()[-1]))
    return {"mode": mode, "processes": processes, "tokens": args.tokens, "requests": args.requests,
            "batch_size": args.batch_size, "wall_s": round(wall, 2), "jobs": reports}


def mean_wall(results: list[dict], mode: str) -> float | None:
    walls = [r["wall_s"] for r in results if r["mode"] == mode]
    return sum(walls) / len(walls) if walls else None


def table(results: list[dict]) -> str:
    """A row per timed mode run; the ratio is its wall time over the mean wall time of lock off."""
    off = mean_wall(results, "off")
    lines = ["| mode | first batch per process (s) | first batch ends at (s) | all done (wall s) | wall / lock off |",
             "| --- | --- | --- | --- | --- |"]
    for r in results:
        jobs = sorted(r["jobs"], key=lambda job: job["first_batch_end_at"])
        ratio = f"{r['wall_s'] / off:.3f}" if off else "-"
        lines.append(f"| lock {r['mode']} | {', '.join(str(j['first_batch_s']) for j in jobs)} | "
                     f"{', '.join(str(j['first_batch_end_at']) for j in jobs)} | {r['wall_s']} | {ratio} |")
    on = mean_wall(results, "on")
    if on and off:
        lines.append(f"\nlock on / lock off, mean wall time until all {results[0]['processes']} are done: "
                     f"{on / off:.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="a model dir quamba.load reads (e.g. a W8A8 one)")
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=512, help="tokens per request")
    parser.add_argument("--requests", type=int, default=32, help="requests per process")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--modes", default="off,on", help="comma-separated, of: off, on")
    parser.add_argument("--repeats", type=int, default=1, help="runs of the modes, the order reversed every other")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up process")
    parser.add_argument("--timeout", type=float, default=1800, help="s per mode before its processes are killed")
    parser.add_argument("--child", type=float, metavar="LAUNCHED", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")  # the lock's waits
        print(json.dumps(child(args.model_dir, args.child, args.batch_size, args.tokens, args.requests,
                               args.device)), flush=True)
        return
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    if not modes or any(mode not in MODES for mode in modes):
        parser.error(f"--modes: {args.modes!r}; allowed: a comma-separated list of {', '.join(MODES)}")
    if args.tokens <= CONTINUATION:
        parser.error(f"--tokens: must exceed the {CONTINUATION} continuation tokens of each request")
    if args.processes < 1 or args.repeats < 1:
        parser.error("--processes and --repeats: must be >= 1")
    if not args.no_warmup:
        warmup = run_mode("off", args, processes=1)
        print(json.dumps({"warmup": True, **warmup}), file=sys.stderr, flush=True)
    results = []
    for repeat in range(args.repeats):
        for mode in modes if repeat % 2 == 0 else modes[::-1]:
            results.append(run_mode(mode, args))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
