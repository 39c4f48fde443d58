"""The resumable state of an evaluation: one JSON file per process, written atomically.

A run with one process keeps its state in ``<output>.partial``; rank ``r`` of
a ``torchrun`` run of ``W`` processes in ``<output>.partial.rank<r>-of-<W>``.
A state holds a fingerprint of the configuration (model, data, methods,
metrics, options, batch size...), how many batches / samples of the rank's
shard are done, the skipped samples and the metric states. It is written
after every ``save_every`` batches to a temporary file in the same folder,
fsync'ed and moved over the old one (``os.replace``), so a kill at any moment
leaves the previous state intact.

A run refuses to resume a state of another configuration, or of another
world size (the shards would differ), unless it is started with ``restart``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from .outputs import write_json

__all__ = [
    "STATE_VERSION",
    "RankState",
    "partial_path",
    "find_partials",
    "check_world_size",
    "discard_partials",
    "load_state",
    "save_state",
    "jsonable",
    "atomic_write_json",
    "config_fingerprint",
    "config_diff",
]

STATE_VERSION = 2  # 2: exact (mergeable) sums in the metric states, per-rank files

PathLike = Union[str, os.PathLike]


def jsonable(x: Any) -> Any:
    """Plain JSON (NaN / Inf -> None, tuples -> lists, tensors -> numbers)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return jsonable(x.tolist())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if hasattr(x, "item") and callable(x.item):  # numpy scalars
        return jsonable(x.item())
    return x


def atomic_write_json(path: PathLike, obj: Any, option: Optional[str] = None, what: str = "output file") -> None:
    """Write JSON to ``path`` atomically (tmp file in the same folder, fsync, ``os.replace``).

    A symbolic link at ``path`` is refused and a failed write (a full disk)
    leaves the previous file intact and no temporary file behind; both raise
    an :class:`~tokentm_fast.evaluation.outputs.OutputError` naming the file
    (see :mod:`.outputs`).
    """
    write_json(path, obj, option=option, what=what)


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """A short hash of a (JSON-able) configuration."""
    return hashlib.sha256(json.dumps(jsonable(config), sort_keys=True).encode()).hexdigest()[:16]


def config_diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> List[str]:
    """``"key: old -> new"`` for every (nested) key where two configurations differ."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


# ----------------------------------------------------------------------------
# file names
# ----------------------------------------------------------------------------

def partial_path(output: PathLike, rank: int = 0, world_size: int = 1) -> Path:
    """Where the resumable state of ``output`` (of ``rank`` in a run of ``world_size`` processes) lives."""
    if int(world_size) <= 1:
        return Path(str(output) + ".partial")
    return Path(f"{output}.partial.rank{int(rank)}-of-{int(world_size)}")


_RANK_FILE = re.compile(r"\.partial\.rank(\d+)-of-(\d+)$")


def find_partials(output: PathLike) -> List[Tuple[Path, int, int]]:
    """The partial states of ``output`` in its folder: ``(path, rank, world_size)``, sorted."""
    p = Path(output)
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        return []
    found = []
    single = partial_path(output)
    if single.is_file():
        found.append((single, 0, 1))
    prefix = p.name + ".partial.rank"
    for q in folder.iterdir():
        if q.name.startswith(prefix):
            m = _RANK_FILE.search(q.name)
            if m and q.name == f"{p.name}.partial.rank{m.group(1)}-of-{m.group(2)}":
                found.append((q, int(m.group(1)), int(m.group(2))))
    return sorted(found, key=lambda t: (t[2], t[1]))


def check_world_size(output: PathLike, world_size: int) -> Optional[str]:
    """A message if ``output`` has partial states of a run with another number of processes (else None)."""
    other = sorted({w for _, _, w in find_partials(output) if w != int(world_size)})
    if not other:
        return None
    was = " / ".join(f"{w} process{'es' if w > 1 else ''}" for w in other)
    now = f"{world_size} process{'es' if world_size > 1 else ''}"
    how = ("torchrun --nproc_per_node=... (in all: the same number of processes)" if other[0] > 1
           else "one process (no torchrun)")
    return (f"refusing to resume: the partial state of {output} was written by a run of {was}, this run has {now} "
            f"(the data would be sharded differently). Start it again with {how} to resume, "
            "or use --restart (restart=True) to discard the partial state and start over")


def discard_partials(output: PathLike) -> List[Path]:
    """Remove every partial state of ``output`` (any world size); returns the paths removed."""
    removed = []
    for p, _, _ in find_partials(output):
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:  # another rank was faster
            pass
    return removed


# ----------------------------------------------------------------------------
# the state of one rank
# ----------------------------------------------------------------------------

@dataclass
class RankState:
    """Progress of one rank through its shard, with the accumulated metric states."""

    batches: int = 0  # batches of the shard done
    done: int = 0  # samples of the shard consumed (evaluated or skipped)
    images: int = 0  # images evaluated
    sanity_images: int = 0  # images that entered the sanity metric
    skipped: List[Dict[str, Any]] = field(default_factory=list)  # {"index", "id", "error"}
    elapsed_s: float = 0.0  # time spent by earlier runs (of this rank)
    states: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # method -> metric -> state_dict


def save_state(path: Path, fingerprint: str, config: Mapping[str, Any], rank: int, world_size: int,
               state: RankState) -> None:
    """Write ``state`` atomically to ``path`` (a link there is refused; a failed write keeps the old state)."""
    atomic_write_json(path, jsonable({
        "fingerprint": fingerprint,
        "config": config,
        "rank": int(rank),
        "world_size": int(world_size),
        "pid": os.getpid(),
        "batches": state.batches,
        "done": state.done,
        "images": state.images,
        "sanity_images_done": state.sanity_images,
        "skipped": state.skipped,
        "elapsed_s": state.elapsed_s,
        "states": state.states,
    }), option="--output", what="resumable state")


def load_state(path: Path, fingerprint: str, config: Mapping[str, Any],
               rank: int = 0, world_size: int = 1) -> Tuple[Optional[RankState], Optional[str]]:
    """Read the state at ``path``: ``(state, None)``, ``(None, None)`` if there is none, ``(None, error)``."""
    if not path.exists():
        return None, None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except Exception as e:
        return None, f"cannot read the partial state {path} ({e}); remove it or use --restart"
    if not isinstance(d, dict) or "fingerprint" not in d:
        return None, f"{path} is not a partial state of this runner; remove it or use --restart"
    if d["fingerprint"] != fingerprint:
        diff = config_diff(d.get("config", {}), jsonable(config))
        return None, (f"refusing to resume from {path}: it was written by a different configuration"
                      + (f" ({'; '.join(diff[:6])})" if diff else "")
                      + ". Use --restart (restart=True) to discard it and start over, or run the original configuration")
    if int(d.get("world_size", 1)) != int(world_size) or int(d.get("rank", 0)) != int(rank):
        return None, (f"{path} holds the state of rank {d.get('rank', 0)} of {d.get('world_size', 1)}, "
                      f"not of rank {rank} of {world_size}; use --restart to start over")
    try:
        state = RankState(
            batches=int(d["batches"]), done=int(d["done"]), images=int(d["images"]),
            sanity_images=int(d.get("sanity_images_done", 0)), skipped=list(d.get("skipped", [])),
            elapsed_s=float(d.get("elapsed_s", 0.0)), states=dict(d["states"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        return None, f"the partial state {path} is incomplete ({type(e).__name__}: {e}); remove it or use --restart"
    return state, None

