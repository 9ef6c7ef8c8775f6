"""Batch generation as a resumable job: `edgemoe cluster generate`.

    ray job submit --working-dir . -- edgemoe cluster generate --model M \
        --prompts in.jsonl --out out.jsonl

The prompts file is read and checked whole before anything starts (one
`BadPromptsFile` line naming the line). Each prompt's result is written
atomically (a temporary file renamed) to OUT.parts/<index>.json as soon as it
is done, and OUT is assembled atomically from the parts in input order at
the end. A job that was interrupted and is submitted again finds the parts
already written and generates only the missing prompts: nothing is redone or
duplicated. Progress goes to stdout, which is the job's log.

Nodes come from `--nodes FILE` or, without it, from the cluster itself: every
raylet `edgemoe cluster up` starts carries its node's spec as Ray labels.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.types import BadPromptsFile, ClusterError, Link, NodeSpec
from edgemoe.units import Bytes

LABEL = "edgemoe-node"  # the label every edgemoe raylet carries (its node name)


@dataclass(frozen=True)
class PromptItem:
    index: int
    id: str
    prompt: object  # text, or a list of token ids
    max_tokens: int | None = None
    klass: object = None  # its MoE² RequestClass (latency_ms / energy_mj keys), None: unlimited


def read_prompts(path: str | Path) -> list[PromptItem]:
    """Every line a JSON object {"prompt": text or [ids], "id"?: str, "max_tokens"?: int,
    "latency_ms"?: number, "energy_mj"?: number} (the last two: the request's MoE² class).

    Raises:
        BadPromptsFile: names the file and line.
    """
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise BadPromptsFile(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadPromptsFile(f"{p}: cannot read it ({e})") from None
    items: list[PromptItem] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{p}, line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadPromptsFile(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise BadPromptsFile(f"{where}: not a JSON object")
        unknown = set(obj) - {"prompt", "id", "max_tokens", "latency_ms", "energy_mj"}
        if unknown:
            raise BadPromptsFile(f"{where}: unknown key(s) {sorted(unknown)}")
        prompt = obj.get("prompt")
        ok_ids = (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
        )
        if not ((isinstance(prompt, str) and prompt.strip()) or ok_ids):
            raise BadPromptsFile(f"{where}: 'prompt' must be non-empty text or token ids")
        pid = obj.get("id", len(items))
        if not isinstance(pid, (str, int)) or isinstance(pid, bool):
            raise BadPromptsFile(f"{where}: 'id' must be text or a number")
        pid = str(pid)
        if pid in seen:
            raise BadPromptsFile(f"{where}: id {pid!r} was used on line {seen[pid]}")
        seen[pid] = n
        mt = obj.get("max_tokens")
        if mt is not None and (isinstance(mt, bool) or not isinstance(mt, int) or mt < 1):
            raise BadPromptsFile(f"{where}: 'max_tokens' must be a whole number >= 1")
        budgets = {}
        for key in ("latency_ms", "energy_mj"):
            v = obj.get(key)
            if v is not None and (
                isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0
            ):
                raise BadPromptsFile(f"{where}: {key!r} must be a number > 0")
            budgets[key] = v
        klass = None
        if budgets["latency_ms"] is not None or budgets["energy_mj"] is not None:
            from cluster.selection import RequestClass

            lat, mj = budgets["latency_ms"], budgets["energy_mj"]
            klass = RequestClass(
                f"{lat or '-'}ms/{mj or '-'}mJ",
                float("inf") if lat is None else lat / 1e3,
                None if mj is None else mj / 1e3,
            )
        items.append(PromptItem(len(items), pid, prompt, mt, klass))
    if not items:
        raise BadPromptsFile(f"{p}: no prompts")
    return items


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def done_indices(out: Path, items: list[PromptItem]) -> set[int]:
    """Prompts whose result is already written (and is for the same id)."""
    d = parts_dir(out)
    done = set()
    for it in items:
        f = d / f"{it.index}.json"
        try:
            rec = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if rec.get("id") == it.id:
            done.add(it.index)
    return done


def label_specs(nodes: list[dict]) -> list[NodeSpec]:
    """NodeSpecs from `ray.nodes()` records: alive raylets with edgemoe labels."""
    out = []
    for n in nodes:
        lab = n.get("Labels") or {}
        if not n.get("Alive") or LABEL not in lab:
            continue
        bw = int(lab.get("edgemoe-bandwidth", "0"))
        out.append(
            NodeSpec(
                lab[LABEL],
                lab["edgemoe-profile"],
                Bytes(int(lab["edgemoe-budget"])),
                Link(int(lab.get("edgemoe-rtt-us", "0")) / 1e6, Bytes(bw) if bw else None),
                lab.get("edgemoe-paging", "1") == "1",
            )
        )
    return sorted(out, key=lambda s: s.name)


def spec_labels(spec: NodeSpec) -> dict[str, str]:
    """The labels a raylet carries for `label_specs` to read back."""
    return {
        LABEL: spec.name,
        "edgemoe-profile": spec.profile,
        "edgemoe-budget": str(int(spec.budget)),
        "edgemoe-rtt-us": str(round(spec.link.rtt_s * 1e6)),
        "edgemoe-bandwidth": str(int(spec.link.bandwidth or 0)),
        "edgemoe-paging": "1" if spec.paging else "0",
    }


def generate_job(
    model: str | Path,
    prompts: str | Path,
    out: str | Path,
    *,
    specs: list[NodeSpec] | None = None,
    max_tokens: int = 64,
    sampling=None,
    copies: int = 1,
    log=print,
) -> dict:
    """Generate every prompt not yet done; returns counts.

    Raises:
        BadPromptsFile: before anything starts; ClusterError: no nodes.
    """
    from cluster.coordinator import Coordinator
    from cluster.raynet import connect
    from edgemoe.sampling import Sampling

    items = read_prompts(prompts)
    out = Path(out).absolute()
    parts = parts_dir(out)
    parts.mkdir(parents=True, exist_ok=True)
    done = done_indices(out, items)
    todo = [it for it in items if it.index not in done]
    log(f"edgemoe job: {len(items)} prompts, {len(done)} already done, {len(todo)} to generate")
    if todo:
        ray = connect()
        specs = specs or label_specs(ray.nodes())
        if not specs:
            raise ClusterError(
                "the cluster has no edgemoe nodes",
                "start them with `edgemoe cluster up --nodes FILE`, or pass --nodes",
            )
        s = sampling or Sampling.greedy()
        with Coordinator(model, specs, copies=copies) as co:
            log(f"edgemoe job: hosts {', '.join(co.live())} serving map v{co.executor.map.version}")
            t0 = time.perf_counter()
            for k, it in enumerate(todo, start=1):
                (c,) = co.complete([it.prompt], it.max_tokens or max_tokens, s, [it.klass])
                rec = {
                    "id": it.id,
                    "text": c.text,
                    "token_ids": c.token_ids,
                    "finish_reason": c.finish_reason,
                }
                _write_atomic(parts / f"{it.index}.json", json.dumps(rec) + "\n")
                log(
                    f"edgemoe job: [{len(done) + k}/{len(items)}] id {it.id}: "
                    f"{len(c.token_ids)} tokens ({time.perf_counter() - t0:.1f} s)"
                )
    lines = [(parts / f"{it.index}.json").read_text(encoding="utf-8") for it in items]
    _write_atomic(out, "".join(lines))
    log(f"edgemoe job: wrote {out} ({len(items)} results)")
    return {"prompts": len(items), "skipped": len(done), "generated": len(todo)}
