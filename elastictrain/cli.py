"""Command line: ``elastictrain [train] [--config FILE] [--section.key value ...]``, ``elastictrain ckpt ...``,
``elastictrain plot RUN_DIR``, ``elastictrain predict ...``. Teardown happens in one ``try/finally``."""

from __future__ import annotations

import dataclasses
import logging
import sys

from elastictrain.config import ALIASES, Config, field_docs, load_config
from elastictrain.errorfile import record_atomically
from elastictrain.errors import EXIT_USER_ERROR, UserError, user_message
from elastictrain.osutil import launcher

log = logging.getLogger("elastictrain")

USAGE = """\
usage: elastictrain [train] [--config FILE] [--section.key VALUE ...]
       elastictrain ckpt {list,inspect,export,clean} ...
       elastictrain plot RUN_DIR [--out FILE]
       elastictrain predict --model RUN_DIR|final_model.pt|SNAPSHOT --input DIR --output DIR [--masks DIR]

Fault-tolerant segmentation training. Run it plainly (one device, no process group) or under torchrun
(DDP/FSDP2); it always resumes from the latest complete snapshot in --run.dir.

  python -m elastictrain --config configs/tiny.yaml --run.dir runs/tiny
  torchrun --nproc-per-node 2 -m elastictrain --config configs/tiny.yaml --run.dir runs/tiny2

Exit status: 0 finished, 75 stopped by a preemption signal after a snapshot (run the same command
again to continue), 130 stopped at once by a second Ctrl-C (no snapshot of that step), 2 a mistake
to fix (configuration, a path or file, a run directory in use by another run, a diverged loss), 1 any
other failure.
"""


def help_text() -> str:
    lines = [USAGE, "settings (YAML 'section: {key: value}' or --section.key VALUE):"]
    for f in dataclasses.fields(Config):
        section = f.default_factory()  # type: ignore[misc]
        docs = field_docs(type(section))
        lines.append(f"\n  {f.name}:")
        for sf in dataclasses.fields(section):
            lines.append(f"    --{f.name}.{sf.name} (default {getattr(section, sf.name)!r})")
            lines.append(f"        {docs.get(sf.name, '')}")
    lines.append("\naliases kept from the seed trainer:")
    lines += [f"  {alias:<15} = --{target}" for alias, target in ALIASES.items()]
    return "\n".join(lines) + "\n"


def train(argv: list[str]) -> int:
    try:
        cfg = load_config(argv)
        # Before any process group: a machine without the weights gets one message, not a hung job; local
        # rank 0 downloads, the node's other ranks wait for its files in the cache.
        if cfg.model.encoder_weights is not None:
            from elastictrain.model import fetch_encoder_weights

            fetch_encoder_weights(cfg.model, launcher().local_rank, cfg.dist.timeout_s)
    except (ValueError, FileNotFoundError) as e:
        sys.stderr.write(f"elastictrain: {e}\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # Ctrl-C while downloading weights: no handler is installed yet, nothing to save
        from elastictrain.preemption import INTERRUPTED_EXIT_CODE

        sys.stderr.write("elastictrain: interrupted before training started\n")
        return INTERRUPTED_EXIT_CODE
    return run_training(cfg)


@record_atomically
def run_training(cfg: Config) -> int:
    """Set up, train, and tear down whatever happens; @record_atomically leaves torchrun a readable error
    file (see errorfile.py).

    A :class:`UserError` (a setting, path or file the user can fix) ends the run with one line on stderr
    and exit 2, on every rank that raises it, without a traceback.
    """
    import signal
    from pathlib import Path

    from elastictrain import lifeline, runlock
    from elastictrain.config import to_dict
    from elastictrain.dist import check_same_config, init_distributed, teardown
    from elastictrain.console import setup_logging
    from elastictrain.preemption import Preemption

    # Handlers first: start-up (rendezvous, model, restore) can take many seconds, and a preemption signal
    # arriving then must become a snapshot at the first step boundary rather than kill the process.
    preemption = Preemption(cfg.preemption)
    preemption.install()
    if launcher().by_torchrun:  # an orphan stops through the same path (see lifeline.py)
        stop = signal.Signals[cfg.preemption.signals[0]] if cfg.preemption.signals else signal.SIGTERM
        lifeline.watch_launcher(stop, cfg.preemption.deadline_s)
    setup_logging(None, launcher().rank)  # stderr until the run directory is ours
    ctx = trainer = lock = watchdog = None
    try:
        ctx = init_distributed(cfg)
        check_same_config(ctx, to_dict(cfg))
        lock = runlock.acquire(cfg, ctx)  # before anything reads or writes the run directory
        setup_logging(Path(cfg.run.dir), ctx.rank)
        from elastictrain import liveness
        from elastictrain.trainer import Trainer

        progress = liveness.Progress()
        watchdog = liveness.start_for(cfg, ctx, progress)
        trainer = Trainer(cfg, ctx, preemption, progress)
        return trainer.train()
    except UserError as e:
        log.error("%s", user_message(e))
        return EXIT_USER_ERROR
    finally:
        if watchdog is not None:  # first: a peer that finished and went away is no loss
            watchdog.stop()
        if trainer is not None:
            trainer.close()
        else:
            preemption.uninstall()
        if lock is not None:
            lock.release()
        teardown(ctx)
        preemption.hold_to_exit()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv[:1]) or argv[:2] in (["train", "-h"], ["train", "--help"]):
        sys.stdout.write(help_text())
        return 0
    if argv[:1] == ["ckpt"]:
        from elastictrain.ckpt_cli import main as ckpt_main

        return ckpt_main(argv[1:])
    if argv[:1] == ["plot"]:
        from elastictrain.plot import main as plot_main

        return plot_main(argv[1:])
    if argv[:1] == ["predict"]:
        from elastictrain.predict import main as predict_main

        return predict_main(argv[1:])
    if argv[:1] == ["train"]:
        argv = argv[1:]
    return train(argv)
