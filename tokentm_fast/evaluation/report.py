"""The results of an evaluation: merging the ranks' metric states, the results dict, the table.

``merge_rank_states`` adds the metric states of every rank (integer counts and
exact sums: the merged numbers are those of one process); ``build_results``
assembles the results JSON (records, model, data, counts, the world size and
what each rank evaluated, timings); ``format_table`` prints it as markdown,
``table_footnotes`` says what its ``n/a`` cells mean; ``table_markdown`` (the
table and its footnotes) and ``print_results`` (those and a summary of the run)
are what the command line writes and prints.
"""
from __future__ import annotations

import platform
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .state import jsonable

__all__ = ["summarize_sanity", "merge_rank_states", "build_results", "format_table", "table_footnotes",
           "table_markdown", "print_results", "NA_REASONS", "versions"]


def versions() -> Dict[str, str]:
    """Versions of the packages that produced the numbers."""
    import timm

    from .. import __version__

    return {"tokentm_fast": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def summarize_sanity(values: Dict[str, Any]) -> Dict[str, Any]:
    """Sanity values plus the correlations of the first (top block) and last (fully random) stages."""
    stages = values.get("stages") or []
    out = dict(values)
    if stages:
        out["spearman_top_block"] = stages[0]["spearman"]
        out["spearman_full_random"] = stages[-1]["spearman"]
    return out


def merge_rank_states(
    make_metric: Callable[[str, str], Any], methods: Sequence[str], metrics: Sequence[str],
    rank_states: Sequence[Mapping[str, Mapping[str, Any]]],
) -> Dict[str, Dict[str, Any]]:
    """Fresh accumulators (``make_metric(method, metric)``) holding the sum of every rank's state."""
    accs = {m: {k: make_metric(m, k) for k in metrics} for m in methods}
    for states in rank_states:
        for m in methods:
            for k in metrics:
                s = states.get(m, {}).get(k)
                if s is not None:
                    accs[m][k].merge_state_dict(s)
    return accs


def build_results(
    *,
    accs: Mapping[str, Mapping[str, Any]],
    methods: Sequence[str],
    metrics: Sequence[str],
    config: Mapping[str, Any],
    fingerprint: str,
    model_info: Mapping[str, Any],
    data_info: Mapping[str, Any],
    unavailable: Mapping[str, str],
    warnings: Sequence[str],
    ranks: Sequence[Mapping[str, Any]],
    n_total: int,
    command: Optional[Sequence[str]],
    run: Mapping[str, Any],
    extra: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """The results dict (plain JSON) of merged accumulators and the per-rank summaries ``ranks``.

    ``ranks[r]`` has ``samples``, ``images``, ``sanity_images``, ``skipped``
    (list of ``{"index", "id", "error"}``) and ``device``.
    """
    records = []
    for m in methods:
        for k in metrics:
            values = accs[m][k].compute()
            if k == "sanity":
                values = summarize_sanity(values)
            records.append({"method": m, "metric": k, "values": values})
    skipped: List[Dict[str, Any]] = sorted((s for r in ranks for s in r["skipped"]), key=lambda s: s.get("index", -1))
    results = {
        "records": records,
        "model": dict(model_info),
        "data": dict(data_info),
        "data_config": config["data_config"],
        "methods": list(methods),
        "metrics": list(metrics),
        "unavailable": dict(unavailable),
        "warnings": list(warnings),
        "method_options": config["method_options"],
        "backend": config["backend"],
        "device": config["device"],
        "dtype": config["dtype"],
        "batch_size": config["batch_size"],
        "target": config["target"],
        **dict(extra or {}),
        "command": list(command) if command is not None else list(sys.argv),
        "versions": versions(),
        "counts": {
            "samples_in_data": n_total,
            "samples": sum(r["samples"] for r in ranks),
            "images_evaluated": sum(r["images"] for r in ranks),
            "skipped": len(skipped),
            "sanity_images": sum(r["sanity_images"] for r in ranks) if "sanity" in metrics else 0,
        },
        "skipped": [{"id": s["id"], "error": s["error"]} for s in skipped],
        "world_size": len(ranks),
        "ranks": [{"rank": i, "samples": r["samples"], "images": r["images"], "skipped": len(r["skipped"]),
                   "device": r["device"]} for i, r in enumerate(ranks)],
        "fingerprint": fingerprint,
        "run": dict(run),
    }
    return jsonable(results)


_COLUMNS = (
    ("segmentation", "pixel_accuracy", "Pixel acc ↑"),
    ("segmentation", "miou", "mIoU ↑"),
    ("segmentation", "map", "mAP ↑"),
    ("perturbation", "pos_auc_predicted", "Pos. AUC ↓"),
    ("perturbation", "neg_auc_predicted", "Neg. AUC ↑"),
    ("perturbation", "pos_auc_target", "Pos. AUC tgt ↓"),
    ("perturbation", "neg_auc_target", "Neg. AUC tgt ↑"),
    ("perturbation", "aopc", "AOPC ↑"),
    ("perturbation", "lodds", "LOdds ↓"),
    ("sanity", "spearman_full_random", "Rand. ρ ↓"),
)


def format_table(results: Mapping[str, Any], digits: int = 4) -> str:
    """A markdown table (methods x metric values) of a results dict."""
    records = results["records"]
    methods: List[str] = []
    values: Dict[Tuple[str, str], Dict[str, Any]] = {}
    for r in records:
        if r["method"] not in methods:
            methods.append(r["method"])
        values[(r["method"], r["metric"])] = r["values"]
    cols = [(metric, key, title) for metric, key, title in _COLUMNS
            if any(key in values.get((m, metric), {}) for m in methods)]

    def fmt(v: Any) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{v:.{digits}f}"
        return str(v)

    header = "| Method | " + " | ".join(t for _, _, t in cols) + " |"
    sep = "|---|" + "|".join("---:" for _ in cols) + "|"
    rows = [header, sep]
    for m in methods:
        cells = [fmt(values.get((m, metric), {}).get(key)) for metric, key, _ in cols]
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


#: What an ``n/a`` cell of the results table means, by the start of its column title.
NA_REASONS = (
    ("Rand. ρ", "Spearman ρ is undefined for a constant map (e.g. all zeros, as attention Grad-CAM gives on a "
                "randomized model): a constant map has no ranking to correlate"),
    ("Pos. AUC tgt", "no true labels for these images, so the target-class variant is undefined"),
    ("Neg. AUC tgt", "no true labels for these images, so the target-class variant is undefined"),
    ("mAP", "average precision is undefined when no image has both foreground and background pixels"),
)


def table_footnotes(table: str) -> List[str]:
    """Footnotes for the ``n/a`` cells of a markdown results table (one per column, empty if none)."""
    lines = [ln for ln in table.splitlines() if ln.startswith("|")]
    if len(lines) < 3:
        return []
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    notes = []
    for col, title in enumerate(header):
        methods = []
        for ln in lines[2:]:
            cells = [c.strip() for c in ln.strip("|").split("|")]
            if col < len(cells) and cells[col] == "n/a":
                methods.append(cells[0])
        if not methods:
            continue
        why = next((r for t, r in NA_REASONS if title.startswith(t)),
                   "the metric is undefined for these maps and images (it gave NaN)")
        notes.append(f"n/a in {title} ({', '.join(methods)}): {why}.")
    return notes


def table_markdown(results: Mapping[str, Any]) -> str:
    """The results table of ``results`` followed by its footnotes, each as a paragraph (markdown)."""
    table = format_table(results)
    notes = "".join(f"\n{n}\n" for n in table_footnotes(table))
    return table + "\n" + notes


def print_results(results: Mapping[str, Any], output: Optional[str]) -> None:
    """Print the results table, its footnotes and what was evaluated (stdout); ``output``: the results JSON."""
    c = results["counts"]
    table = format_table(results)
    print()
    print(table)
    for note in table_footnotes(table):
        print(note)
    print()
    extra = f", {c['skipped']} skipped" if c["skipped"] else ""
    run = results["run"]
    resumed = f" (resumed after {run['resumed_from']} samples)" if run["resumed_from"] else ""
    ranks = results.get("ranks") or []
    procs = (f" by {len(ranks)} processes ({', '.join(str(r['images']) for r in ranks)} images)"
             if len(ranks) > 1 else "")
    print(f"{c['images_evaluated']} images evaluated{procs}{extra}{resumed}; data: {results['data'].get('kind')}, "
          f"model: {results['model'].get('name')}")
    if results.get("preprocessing"):
        print(f"preprocessing: {results['preprocessing']}")
    # the run's warnings were said once when it started (stderr) and are in the results JSON under "warnings"
    for name, why in results.get("unavailable", {}).items():
        print(f"{name}: unavailable ({why})")
    for s in results.get("skipped", []):
        print(f"skipped {s['id']}: {s['error']}")
    if output:
        print(f"results: {output}")
