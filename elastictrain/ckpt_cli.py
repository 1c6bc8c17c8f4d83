"""``elastictrain ckpt``: look at, export and tidy the snapshots of a run, with no training job running.

    elastictrain ckpt list RUN_DIR [--verify]      every snapshot (durable and node-local): tier, epoch, step,
                                                   samples, state, val loss, size
    elastictrain ckpt inspect SNAPSHOT             counters, best val loss, history, world size, engine, config
    elastictrain ckpt export SNAPSHOT OUT.pt       plain state dict for inference (torch.load(weights_only=True))
    elastictrain ckpt clean RUN_DIR [--yes]        delete rolling snapshots no resume needs; a dry run unless --yes;
                                                   permanent, best and damaged ones only with --delete-KIND;
                                                   names other runs' node-local tiers, deletes the stale ones

Everything runs at world size 1 on CPU without a process group, whatever world size wrote the snapshot.
Exit status: 0 done, 1 a snapshot is damaged or unreadable, 2 a usage error or a missing path.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from elastictrain.snapshot import manifest
from elastictrain.errors import UserError

DELETABLE = ("permanent", "best", "damaged")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elastictrain ckpt", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list the snapshots of a run directory")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--verify", action="store_true", help="hash every file against the commit manifest")
    p.add_argument("--local-dir", help="the run's checkpoint.local_dir (default: from RUN_DIR/config.yaml)")
    p = sub.add_parser("inspect", help="what a snapshot holds besides tensors")
    p.add_argument("snapshot", type=Path)
    p.add_argument("--full-config", action="store_true", help="print the whole stored config")
    p.add_argument("--no-verify", action="store_true", help="skip the checksum check before reading")
    p = sub.add_parser("export", help="write the model weights as a plain state dict")
    p.add_argument("snapshot", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--no-verify", action="store_true", help="skip the checksum check before reading")
    p = sub.add_parser("clean", help="delete rolling snapshots no resume needs (dry run unless --yes)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--yes", action="store_true", help="really delete (default: only print the plan)")
    p.add_argument("--local-dir", help="the run's checkpoint.local_dir (default: from RUN_DIR/config.yaml)")
    for kind in DELETABLE:
        p.add_argument(f"--delete-{kind}", action="store_true", help=f"also delete {kind} snapshots (kept otherwise)")
    return parser


def main(argv: list[str]) -> int:
    """Run one ``ckpt`` subcommand; returns the exit status."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed the usage (or --help)
        return int(e.code or 0)
    try:
        return {"list": list_snapshots, "inspect": inspect, "export": export, "clean": clean}[args.command](args)
    except (FileNotFoundError, UserError) as e:
        sys.stderr.write(f"elastictrain ckpt {args.command}: {e}\n")
        return 2
    except ValueError as e:
        sys.stderr.write(f"elastictrain ckpt {args.command}: {e}\n")
        return 1


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        _out("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def list_snapshots(args: argparse.Namespace) -> int:
    from elastictrain.snapshot import localtier
    from elastictrain.snapshot.offline import snapshots_root

    status = _list_root(snapshots_root(args.run_dir), args.verify, "durable")
    base, tier_id = localtier.of_run(args.run_dir, args.local_dir)
    local = base / tier_id / "snapshots" if base is not None and tier_id else None
    if local is not None and local.is_dir():
        status = max(status, _list_root(local, args.verify, "local"))
    else:
        _out(f"local tier: none ({'no local tier on this node' if tier_id else 'this run never had one'})")
    return status


def _list_root(root: Path, verify: bool, where: str) -> int:
    """One tier's table; 1 when a snapshot is damaged."""
    snapshots = manifest.list_snapshots(root)
    best = manifest.best_snapshot(snapshots)
    rows = [["", "SNAPSHOT", "TIER", "EPOCH", "STEP", "SAMPLES", "STATE", "VERIFIED", "VAL LOSS", "SIZE"]]
    problems: list[str] = []
    for snap in reversed(snapshots):  # oldest first, like a log
        epoch, step = manifest.parse_name(snap.name)
        verified = "-"
        if snap.complete:
            verified = "not checked"
            if verify:
                problem = snap.verify()
                verified = "ok" if problem is None else "DAMAGED"
                if problem:
                    problems.append(problem)
        elif snap.damaged:
            problems.append(snap.problem)  # type: ignore[arg-type]
        record = snap.commit or (snap.part or {}).get("record")
        val = record.get("val_loss") if record else None
        samples = str(record.get("sample_offset", "-")) if record else "-"
        # A node's part of a local snapshot (three nodes or more): the rest is in other nodes' memory.
        state = "complete" if snap.complete else "DAMAGED" if snap.damaged else \
            f"part ({len(snap.part['held'])} of {len(snap.part['record']['files'])} files)" if snap.part else \
            "INCOMPLETE"
        rows.append(["*" if best is not None and snap.name == best.name else "", snap.name, snap.tier,
                     str(epoch), str(step), samples, state, verified,
                     "-" if val is None else f"{val:.4f}", manifest.human_size(manifest.dir_size(snap.path))])
    _out(f"{where} tier {root}: {len(snapshots)} snapshot(s)")
    if snapshots:
        _table(rows)
        _out(("(* = best by validation loss" if best else "(no best snapshot yet") +
             "; EPOCH = epochs completed, SAMPLES = samples already used of the next one)")
    for path, why in manifest.aside_dirs(root):
        _out(f"moved aside ({why}): {path.name}, {manifest.human_size(manifest.dir_size(path))}")
    for problem in problems:
        _out(f"DAMAGED: {problem}")
    return 1 if problems else 0


def inspect(args: argparse.Namespace) -> int:
    from elastictrain.snapshot.manifest import Snapshot
    from elastictrain.snapshot.offline import open_snapshot, read_snapshot_state

    path: Path = args.snapshot
    commit = open_snapshot(path, verify=not args.no_verify)
    state = read_snapshot_state(path, commit)
    best = "none yet" if state.best_val_loss == float("inf") else f"{state.best_val_loss:.4f}"
    mid = f" (mid-epoch: {state.sample_offset} samples into epoch {state.epoch + 1})" if state.sample_offset else ""
    fields = [
        ("snapshot", str(path)),
        ("engine", commit["engine"]),
        ("tier", commit["tier"]),
        ("committed", datetime.fromtimestamp(commit["committed_at"]).isoformat(timespec="seconds")),
        ("files", f"{len(commit['files'])}, {manifest.human_size(Snapshot(path, commit).size)}"),
        ("epoch", f"{state.epoch} completed{mid}"),
        ("step", f"{state.step} optimizer steps"),
        ("val loss", "-" if commit.get("val_loss") is None else f"{commit['val_loss']:.4f}"),
        ("best val loss", f"{best} (snapshot {state.best_snapshot or '-'})"),
        ("history", f"{len(state.history)} epoch(s)" + (f", last {_last(state.history)}" if state.history else "")),
        ("world size", str(state.world_size)),
        ("rng states", f"{len(state.rng)} rank(s)"),
        ("metrics run id", state.run_id or "-"),
    ]
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        _out(f"{key:<{width}}  {value}")
    _out("config:")
    for line in _config_summary(state.config, args.full_config):
        _out(f"  {line}")
    return 0


def _last(history: list[dict[str, Any]]) -> str:
    h = history[-1]
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in h.items())


def _config_summary(config: dict[str, Any], full: bool) -> list[str]:
    if full:
        import yaml

        return yaml.safe_dump(config, sort_keys=False).splitlines()
    keys = {"model": ("arch", "encoder", "encoder_depth", "decoder_channels", "in_channels"),
            "data": ("source", "image_size", "num_classes"),
            "train": ("epochs", "batch_size", "precision"),
            "optim": ("lr", "schedule", "warmup_steps"),
            "dist": ("strategy",),
            "checkpoint": ("engine", "mode", "interval", "keep", "permanent_every")}
    return [f"{section}: " + ", ".join(f"{k}={config.get(section, {}).get(k)!r}" for k in names)
            for section, names in keys.items()]


def export(args: argparse.Namespace) -> int:
    from elastictrain.export import check_target, export_model
    from elastictrain.snapshot.offline import load_snapshot_model, standalone_context

    out: Path = args.out
    check_target(out)  # before the snapshot is read and proven
    model, state = load_snapshot_model(args.snapshot, verify=not args.no_verify)
    export_model(model, out, standalone_context())
    cfg = state.config
    _out(f"exported the model of {args.snapshot} (epoch {state.epoch}, step {state.step}) to {out}: "
         f"{cfg.get('model', {}).get('arch')} / {cfg.get('model', {}).get('encoder')}, "
         f"{cfg.get('data', {}).get('num_classes')} classes")
    return 0


def clean(args: argparse.Namespace) -> int:
    from elastictrain.snapshot.offline import clean_plan, snapshots_root

    root = snapshots_root(args.run_dir)
    plan = clean_plan(root, frozenset(k for k in DELETABLE if getattr(args, f"delete_{k}"))) + _local_plan(args)
    doomed = [path for path, delete, _, _ in plan if delete]
    freed = sum(manifest.dir_size(path) for path in doomed)
    for path, delete, tier, why in plan:
        _out(f"{'delete' if delete else 'keep':<6}  {path if tier == 'local' else path.name}  [{tier}]  ({why})")
    if not doomed:
        _out("nothing to delete")
        return 0
    if not args.yes:
        _out(f"dry run: would delete {len(doomed)} snapshot(s), {manifest.human_size(freed)}; "
             f"run again with --yes to delete them")
        return 0
    for path in doomed:
        shutil.rmtree(path)
    _out(f"deleted {len(doomed)} snapshot(s), freed {manifest.human_size(freed)}")
    return 0


def _local_plan(args: argparse.Namespace) -> list[tuple[Path, bool, str, str]]:
    """Node-local tiers of other runs under this run's local base: stale ones (their run directory is gone
    or uses another tier) deleted, the others named. This run's own tier is kept (a resume starts there)."""
    from elastictrain.snapshot import localtier

    base, tier_id = localtier.of_run(args.run_dir, args.local_dir)
    if base is None:
        return []
    plan = [(base / tier_id, False, "local", "this run's node-local tier: a resume starts there")] \
        if tier_id and (base / tier_id).is_dir() else []
    for path, whose, stale in localtier.other_tiers(base, tier_id):
        plan.append((path, stale, "local", f"another run's node-local tier, {whose}" + (": stale" if stale else "")))
    return plan
