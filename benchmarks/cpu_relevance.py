"""The LRP family on the CPU against one training step, two checkouts interleaved (issue 28 item 1).

    OMP_NUM_THREADS=2 python benchmarks/cpu_relevance.py --old /tmp/old --rounds 5 --out DIR

``--old`` is another checkout of the package (e.g. ``git worktree add /tmp/old HEAD`` before a change); it
is imported through ``PYTHONPATH``. Each round runs one fresh process per checkout, old and new alternating
(the machine may be shared: interleaving spreads any load over both). A process builds a random-init timm
``vit_base_patch16_224`` (``bench_models.random_vit``), B = ``--batch`` images, float32, ``--threads``
threads, warms every call up once, then times ``--repeats`` times, interleaved: the training step (forward,
cross-entropy, backward with parameter gradients, fused attention, ``zero_grad``) and
``explain(..., backend="torch")`` of each method. A process reports, per method, the median time over its
repeats divided by the median time of the training step in the same process; the table gives the median of
those ratios over the rounds, and the spread (min–max); the same for the process's CPU time
(``time.process_time``), which other processes on a shared machine disturb less than the wall clock. Writes ``cpu_relevance.json`` and
``cpu_relevance.md`` (command, date, versions, machine, table) to ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Tuple

METHODS = ("lrp", "transformer_attribution", "partial_lrp")
HERE = os.path.dirname(os.path.abspath(__file__))


def child(args) -> Dict:
    import torch
    import torch.nn.functional as F
    from bench_models import _fused, random_images, random_vit

    import tokentm_fast as tf

    torch.set_num_threads(args.threads)
    model = random_vit(args.model, "cpu")
    images, target = random_images(model, args.batch, "cpu")

    def step():
        with _fused(model, True):
            F.cross_entropy(model(images), target).backward()
        model.zero_grad(set_to_none=True)

    calls = {"step": step}
    for m in args.methods:
        calls[m] = (lambda m=m: tf.explain(model, images, method=m, target=target, backend="torch"))
    times: Dict[str, List[float]] = {name: [] for name in calls}
    cpu: Dict[str, List[float]] = {name: [] for name in calls}
    for name, call in calls.items():                # warm-up: lazy state outside the measurement
        call()
    for _ in range(args.repeats):
        for name, call in calls.items():
            t0, c0 = time.perf_counter(), time.process_time()
            call()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    med = {name: statistics.median(t) for name, t in times.items()}
    med_cpu = {name: statistics.median(t) for name, t in cpu.items()}
    return {"package": tf.__file__, "seconds": med, "cpu_seconds": med_cpu,
            "ratio": {m: med[m] / med["step"] for m in args.methods},
            "cpu_ratio": {m: med_cpu[m] / med_cpu["step"] for m in args.methods}}


#: the functions of ``lrp_rules`` swapped for the old file's in ``--same-process`` mode
RULES = ("linear", "safe_divide", "clone", "product", "add", "select_row", "mean_rows", "patch_embedding")


def same_process(args) -> Dict:
    """Old and new rules in one process, each call of a method run with both, adjacent, alternating which
    goes first; the step before each method. The old rules come from ``--old-rules`` (an older
    ``lrp_rules.py``), with the pass recording no linear outputs (as before issue 28): valid where the two
    versions differ only in ``lrp_rules`` and that recording. Ratios per adjacent pair, medians over repeats."""
    import importlib.util

    import torch
    import torch.nn.functional as F
    from bench_models import _fused, random_images, random_vit

    import tokentm_fast as tf
    from tokentm_fast.methods import lrp_rules, relevance

    spec = importlib.util.spec_from_file_location("old_lrp_rules", args.old_rules)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    versions = {"new": ({n: getattr(lrp_rules, n) for n in RULES}, relevance._is_linear_module),
                "old": ({n: getattr(old, n) for n in RULES}, lambda point: False)}
    versions["old"][0]["linear"] = lambda x, w, r, rules="ours", xw=None, bias=None, scratch=None: old.linear(x, w, r, rules)

    def use(which: str) -> None:
        funcs, recorder = versions[which]
        for n, f in funcs.items():
            setattr(lrp_rules, n, f)
        relevance._is_linear_module = recorder

    torch.set_num_threads(args.threads)
    model = random_vit(args.model, "cpu")
    images, target = random_images(model, args.batch, "cpu")

    def step():
        with _fused(model, True):
            F.cross_entropy(model(images), target).backward()
        model.zero_grad(set_to_none=True)

    def timed(call) -> Tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        call()
        return time.perf_counter() - t0, time.process_time() - c0

    rows: List[Dict] = []
    for i in range(args.repeats + 1):                                 # repeat 0: warm-up, not counted
        for m in args.methods:
            row = {"method": m, "step": timed(step)}
            for which in (("old", "new") if i % 2 else ("new", "old")):
                use(which)
                row[which] = timed(lambda: tf.explain(model, images, method=m, target=target, backend="torch"))
            use("new")
            if i:
                rows.append(row)
                print(f"repeat {i} {m}: step {row['step'][0]:.2f} s, old {row['old'][0] / row['step'][0]:.2f}×, "
                      f"new {row['new'][0] / row['step'][0]:.2f}×, new/old {row['new'][0] / row['old'][0]:.3f} "
                      f"(cpu: {row['new'][1] / row['old'][1]:.3f})", file=sys.stderr, flush=True)
    return {"rows": rows}


def same_process_table(rows: List[Dict], methods) -> str:
    lines = ["| method | old ÷ step | new ÷ step | new ÷ old (wall) | new ÷ old (CPU time) |", "|---|---|---|---|---|"]
    for m in methods:
        mine = [r for r in rows if r["method"] == m]

        def med(f):
            v = [f(r) for r in mine]
            return f"{statistics.median(v):.2f} ({min(v):.2f}–{max(v):.2f})"
        lines.append(f"| {m} | {med(lambda r: r['old'][0] / r['step'][0])}× | {med(lambda r: r['new'][0] / r['step'][0])}× "
                     f"| {med(lambda r: r['new'][0] / r['old'][0])} | {med(lambda r: r['new'][1] / r['old'][1])} |")
    steps = [r["step"][0] for r in rows]
    lines.append(f"| training step (s, wall) | {statistics.median(steps):.2f} ({min(steps):.2f}–{max(steps):.2f}) | | | |")
    return "\n".join(lines)


def run_child(args, tree: str) -> Dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if tree != "new":
        env["PYTHONPATH"] = os.pathsep.join([tree, HERE] + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model", args.model, "--batch", str(args.batch),
           "--threads", str(args.threads), "--repeats", str(args.repeats), "--methods", *args.methods]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE)
    if proc.returncode != 0:
        raise RuntimeError(f"{tree}: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def versions() -> Dict[str, str]:
    import timm
    import torch

    def git(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=HERE).stdout.strip()

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "commit": git("rev-parse", "--short", "HEAD"), "cpu": cpu, "cores": str(os.cpu_count()),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def table(results: Dict[str, List[Dict]], methods, key: str = "ratio", seconds: str = "seconds") -> str:
    """Median (min–max over the rounds) of each method's ratio to the training step, old and new."""
    lines = [f"| method | old: {key} to the training step | new | new / old |", "|---|---|---|---|"]
    for m in methods:
        cells = []
        for tree in ("old", "new"):
            r = [run[key][m] for run in results[tree]]
            cells.append((statistics.median(r), min(r), max(r)))
        (o, omin, omax), (n, nmin, nmax) = cells
        lines.append(f"| {m} | {o:.2f}× ({omin:.2f}–{omax:.2f}) | {n:.2f}× ({nmin:.2f}–{nmax:.2f}) | {n / o:.2f} |")
    steps = {tree: statistics.median(run[seconds]["step"] for run in results[tree]) for tree in ("old", "new")}
    lines.append(f"| training step ({seconds}) | {steps['old']:.3f} | {steps['new']:.3f} | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--old", help="another checkout of the package, compared with this one")
    p.add_argument("--out")
    p.add_argument("--old-rules", help="an older lrp_rules.py: old and new rules in one process (same_process)")
    p.add_argument("--child", action="store_true")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    command = "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "?") + " python " + " ".join(
        [os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))
    if args.old_rules:
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        rows = same_process(args)["rows"]
        text = "\n".join([f"command: `{command}`", f"date: {started}",
                          "versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()), "",
                          same_process_table(rows, args.methods)])
        print(text)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "same_process.json"), "w") as f:
                json.dump({"command": command, "started": started, "versions": versions(), "rows": rows}, f, indent=1)
            with open(os.path.join(args.out, "same_process.md"), "w") as f:
                f.write(text + "\n")
        return 0
    trees = (["old"] if args.old else []) + ["new"]
    results: Dict[str, List[Dict]] = {t: [] for t in trees}
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for i in range(args.rounds):
        for t in trees:
            res = run_child(args, args.old if t == "old" else "new")
            results[t].append(res)
            print(f"round {i} {t}: " + ", ".join(f"{m} {r:.2f}× (cpu {res['cpu_ratio'][m]:.2f}×)"
                                                 for m, r in res["ratio"].items())
                  + f" (step {res['seconds']['step']:.3f} s, cpu {res['cpu_seconds']['step']:.3f} s)", flush=True)
    if not args.old:
        results["old"] = results["new"]
    report = {"command": command, "started": started, "versions": versions(), "args": vars(args), "runs": results}
    text = "\n".join([f"command: `{command}`", f"date: {started}",
                      "versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), "",
                      "wall-clock time:", "", table(results, args.methods), "",
                      "CPU time of the process (less sensitive to other processes on a shared machine):", "",
                      table(results, args.methods, "cpu_ratio", "cpu_seconds")])
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "cpu_relevance.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(args.out, "cpu_relevance.md"), "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
