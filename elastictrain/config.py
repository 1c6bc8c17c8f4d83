"""Configuration: nested dataclasses are the schema, YAML overrides defaults, argv overrides YAML.

Precedence, lowest first: dataclass defaults < ``--config FILE`` < ``--section.key value`` (and the
seed trainer's short aliases such as ``--epochs``). Every problem found is collected and raised in
one ``ValueError`` that names the flag to change, before any process group exists.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: everything a run writes (snapshots, logs, metrics, final model) goes under it."""
    seed: int = 0
    """Seed for data generation, the per-epoch sample order, augmentation and model init."""
    lock_lease_s: float = 30.0
    """Lease of the run directory's lock (RUN_DIR/.lock): another host may take the lock over this long after
    its holder's last renewal (every lease/5 s). Hosts sharing a run directory need clocks agreeing well within it."""
    name: str = ""
    """Human-readable run name (wandb run name); empty means the run directory's name."""


@dataclass
class DataConfig:
    source: str = "generated"
    """'generated' (synthetic shapes, made locally from the seed) or 'folder' (images/ + masks/ under data.root)."""
    root: str = ""
    """For source=folder: directory holding images/ and masks/ (or train/ and val/, each with both), matching stems."""
    image_size: int = 256
    """Side of the square images fed to the model: images of any size are resized to it (predictions are resized back)."""
    num_classes: int = 4
    """Number of classes including background (class 0); masks hold class ids 0..num_classes-1."""
    class_names: list[str] = field(default_factory=list)
    """One name per class id, for metrics, plots and prediction pictures; empty = background, class1, class2, ..."""
    ignore_index: int | None = None
    """Mask value left out of the loss and the metrics (e.g. 255 for object borders); None = every pixel counts."""
    train_samples: int = 512
    """For source=generated: number of training images."""
    val_samples: int = 64
    """For source=generated: number of validation images."""
    val_fraction: float = 0.1
    """For source=folder without train/ and val/ folders or val_list: fraction of the files (seeded shuffle) for validation."""
    val_list: str = ""
    """For source=folder: a text file naming the validation images (file name or stem per line); the rest train."""
    augment: Any = "default"
    """Training augmentations (torchvision v2, see elastictrain/augment.py): 'default', 'none', or a list like [hflip, {rotate: {degrees: 30}}]."""
    num_workers: int | str = "auto"
    """DataLoader worker processes per rank (0 loads in the training process); 'auto' = the cores per rank minus the one training uses, at most 8."""


@dataclass
class ModelConfig:
    arch: str = "Unet"
    """segmentation-models-pytorch architecture name (Unet, UnetPlusPlus, FPN, DeepLabV3Plus, ...)."""
    encoder: str = "resnet34"
    """smp encoder name (resnet34, mobilenet_v2, tu-<timm name>, ...)."""
    encoder_weights: str | None = None
    """Pretrained encoder weights, e.g. 'imagenet' (for tu- encoders any value means timm's default tag); None never downloads."""
    encoder_depth: int = 5
    """Number of encoder stages (3-5); fewer is smaller and faster."""
    decoder_channels: list[int] = field(default_factory=list)
    """Decoder channels for Unet-style archs, one per encoder stage; empty means smp's default."""
    in_channels: int = 3
    """Input image channels."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    schedule: str = "cosine"
    """LR schedule over all optimizer steps: 'cosine' (to 0) or 'constant'; both after warmup."""
    warmup_steps: int = 0
    """Linear warmup length in optimizer steps."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""


@dataclass
class TrainConfig:
    epochs: int = 20
    """Total epochs to train; raising it on a finished run continues training."""
    log_every: int = 10
    """Log a train-loss line every N optimizer steps."""
    batch_size: int = 16
    """GLOBAL batch size per optimizer step, the same at every world size."""
    micro_batch_size: int = 0
    """Samples per rank per forward pass; 0 = batch_size / world size (no accumulation)."""
    precision: str = "auto"
    """'auto' (bf16 autocast on CUDA/MPS where supported, fp32 on CPU), 'fp32', 'bf16' or 'fp16' (CUDA, with GradScaler)."""
    device: str = "auto"
    """'auto' (cuda, then mps, then cpu), 'cpu', 'cuda' or 'mps'."""


@dataclass
class DistConfig:
    backend: str = "auto"
    """Process-group backend: 'auto' (nccl on CUDA, gloo otherwise), 'gloo' or 'nccl'."""
    timeout_s: float = 300.0
    """Collective timeout: the last resort for a hung peer (liveness below notices a lost one in seconds)."""
    strategy: str = "auto"
    """'auto' (ddp when world size > 1), 'none', 'ddp' or 'fsdp' (FSDP2 fully_shard)."""
    heartbeat_s: float = 1.0
    """Heartbeat period through the job's c10d store (peer liveness and progress, see elastictrain/liveness.py); 0 = off."""
    peer_timeout_s: float = 5.0
    """A peer whose heartbeat is silent this long (or a store that does not answer) is lost: this worker exits 1."""
    hang_timeout_s: float = 0.0
    """Seconds without progress before a rank is hung (stack to its log, exit 1); 0 = learned: max(60, 5 x the slowest time of the phase so far)."""


@dataclass
class CheckpointConfig:
    mode: str = "async"
    """'async' (write while training goes on), 'sync' (block until written) or 'off'."""
    interval: int = 1
    """Take a snapshot every N epochs."""
    every_steps: int = 0
    """Also take a (rolling) snapshot every N optimizer steps inside an epoch; 0 = off."""
    every_minutes: str = "0"
    """Also take a (rolling) snapshot every M minutes inside an epoch: a number, 'auto' (the Young/Daly interval sqrt(2 x measured cost x MTBF)), or 0 = off."""
    mtbf_hours: float = 6.0
    """For every_minutes auto: the expected hours between failures, refined by the failures this run directory has seen."""
    keep: int = 2
    """Rolling snapshots kept (>= 2: the newest may still be in flight). Permanent and best are never counted."""
    permanent_every: int = 10
    """Every N epochs the snapshot is permanent: retention never deletes it. 0 disables."""
    verify: bool = True
    """Verify the checksum manifest of a snapshot before restoring it."""
    engine: str = "torchsnapshot"
    """'torchsnapshot' or 'dcp' (torch.distributed.checkpoint)."""
    local_dir: str = "auto"
    """Node-local snapshot tier in memory: 'auto' (a per-user directory under /dev/shm when it has room for two generations of this rank's state, else off), 'none' (off), or a directory (e.g. local NVMe)."""
    local_every_steps: str = "auto"
    """A node-local snapshot every N optimizer steps: 'auto' (Young/Daly with the local tier's own measured cost), a number, or 0 = off."""
    engine_process: str = "auto"
    """Write snapshots (engine write, fingerprints, checksums) in a process per rank beside training, on CPU: 'auto' (where the node has a core to spare beside each rank), 'on' or 'off' (a thread of the training process)."""
    resume_from: str = ""
    """Snapshot to start this run's lineage from, once (later restarts continue from its newest descendant); empty = the latest complete snapshot in the run directory."""


@dataclass
class MetricsConfig:
    wandb: str = "auto"
    """'auto' (online if WANDB_API_KEY is set, else offline), 'online', 'offline' or 'disabled'."""
    project: str = "elastictrain"
    """wandb project name."""
    progress: str = "auto"
    """tqdm progress bar on rank 0: 'auto' (only on a terminal), 'on' or 'off'."""


@dataclass
class PreemptionConfig:
    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])
    """Signals that request a snapshot-and-exit at the next step boundary."""
    deadline_s: float = 25.0
    """Budget for the preemption snapshot; keep it below torchrun's (30 s) and SLURM's grace periods."""
    exit_code: int = 75
    """Exit status after a preemption snapshot (75 = EX_TEMPFAIL: 'run the same command again'); 3..125."""


@dataclass
class DebugConfig:
    fault: str = ""
    """Test-only fault injection 'KIND@WHERE[:rank=R]' (several: comma-separated), fired once per run dir (see elastictrain/faults.py)."""
    deterministic: bool = True
    """Use deterministic algorithms (bitwise-repeatable runs at a fixed world size)."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


# The seed trainer's flags, kept because users have them in their fingers.
ALIASES: dict[str, str] = {
    "--epochs": "train.epochs",
    "--batch-size": "train.batch_size",
    "--lr": "optim.lr",
    "--device": "train.device",
    "--num-workers": "data.num_workers",
    "--model-type": "model.arch",
    "--checkpoint": "checkpoint.resume_from",
}

CHOICES: dict[str, tuple[str, ...]] = {
    "data.source": ("generated", "folder"),
    "optim.schedule": ("cosine", "constant"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda", "mps"),
    "dist.strategy": ("auto", "none", "ddp", "fsdp"),
    "dist.backend": ("auto", "gloo", "nccl"),
    "checkpoint.mode": ("async", "sync", "off"),
    "checkpoint.engine": ("torchsnapshot", "dcp"),
    "metrics.wandb": ("auto", "online", "offline", "disabled"),
    "metrics.progress": ("auto", "on", "off"),
}


def field_docs(cls: type) -> dict[str, str]:
    """Return each field's docstring (the string literal right under it) for ``--help``."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    body = ast.parse(inspect.getsource(cls)).body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)  # type: ignore[union-attr]
    return docs


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, flag: str, from_cli: bool) -> Any:
    """Convert ``value`` to ``tp``; raise ValueError naming ``flag`` when it cannot be done.

    ``Any`` fields (data.augment) keep YAML's value; from the command line the string is read as YAML.
    """
    if tp is Any:
        if from_cli and isinstance(value, str):
            try:
                return yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise ValueError(f"{flag}: {value!r} is not valid YAML: {e}") from None
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (from_cli and str(value).lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        for tp_ in inner[:-1]:  # int | str: a number when it reads as one, else the word ('auto')
            try:
                return _coerce(value, tp_, flag, from_cli)
            except ValueError:
                pass
        return _coerce(value, inner[-1], flag, from_cli)
    if origin is list:
        if from_cli and isinstance(value, str):
            value = [] if value.strip() in ("", "[]") else [v.strip() for v in value.strip("[]").split(",")]
        if not isinstance(value, list):
            raise ValueError(f"{flag}: expected a list, got {value!r}")
        return [_coerce(v, args[0], flag, True) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{flag}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{flag}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{flag}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{flag}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{flag}: expected a number, got {value!r}") from None
        if not math.isfinite(number):  # --optim.lr inf trains on NaN losses and still exits 0
            raise ValueError(f"{flag}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if value is None:  # YAML '~' or 'null': str(None) would be a directory named 'None'
            raise ValueError(f"{flag}: expected a string, got null (YAML ~); remove the key to keep the default")
        if isinstance(value, (dict, list)):
            raise ValueError(f"{flag}: expected a string, got {value!r}")
        return str(value)
    raise AssertionError(f"unsupported config type {tp} for {flag}")


def _apply(cfg: Config, key: str, value: Any, from_cli: bool, problems: list[str]) -> None:
    """Set ``cfg.<section>.<name>`` from a dotted key, recording problems instead of raising."""
    flag = f"--{key}"
    parts = key.split(".")
    sections = {f.name: f for f in dataclasses.fields(cfg)}
    if len(parts) != 2 or parts[0] not in sections:
        problems.append(f"{flag}: unknown setting (sections: {', '.join(sections)})")
        return
    section = getattr(cfg, parts[0])
    hints = _field_types(type(section))
    if parts[1] not in hints:
        problems.append(f"{flag}: unknown setting (known in '{parts[0]}': {', '.join(hints)})")
        return
    try:
        setattr(section, parts[1], _coerce(value, hints[parts[1]], flag, from_cli))
    except ValueError as e:
        problems.append(str(e))


def _flatten_yaml(data: Any, path: str, problems: list[str]) -> list[tuple[str, Any]]:
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a mapping of sections (run:, data:, model:, ...)")
        return []
    items: list[tuple[str, Any]] = []
    for section, values in data.items():
        if not isinstance(values, dict):
            problems.append(f"--{section}: in {path}, expected a mapping under '{section}:'")
            continue
        items.extend((f"{section}.{k}", v) for k, v in values.items())
    return items


def validate(cfg: Config) -> list[str]:
    """Return every impossible value as 'flag: why' (world-size checks live in the trainer)."""
    p: list[str] = []
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) not in allowed:
            p.append(f"--{key}: must be one of {', '.join(allowed)}, got {getattr(getattr(cfg, section), name)!r}")
    positive = {
        "train.epochs": cfg.train.epochs, "train.batch_size": cfg.train.batch_size,
        "data.image_size": cfg.data.image_size, "checkpoint.interval": cfg.checkpoint.interval,
        "train.log_every": cfg.train.log_every, "model.in_channels": cfg.model.in_channels,
        "dist.timeout_s": cfg.dist.timeout_s, "preemption.deadline_s": cfg.preemption.deadline_s,
        "run.lock_lease_s": cfg.run.lock_lease_s,
    }
    p += [f"--{k}: must be > 0, got {v}" for k, v in positive.items() if v <= 0]
    non_negative = {
        "train.micro_batch_size": cfg.train.micro_batch_size,
        "optim.weight_decay": cfg.optim.weight_decay, "optim.warmup_steps": cfg.optim.warmup_steps,
        "optim.grad_clip": cfg.optim.grad_clip, "checkpoint.permanent_every": cfg.checkpoint.permanent_every,
        "checkpoint.every_steps": cfg.checkpoint.every_steps,
    }
    p += [f"--{k}: must be >= 0, got {v}" for k, v in non_negative.items() if v < 0]
    workers = cfg.data.num_workers
    if workers != "auto" and not (isinstance(workers, int) and not isinstance(workers, bool) and workers >= 0):
        p.append(f"--data.num_workers: a number of worker processes >= 0 or 'auto', got {workers!r}")
    # Renewed every lease / 5 s by a heartbeat thread: below 1 s it spins, above a day its sleep overflows.
    if cfg.run.lock_lease_s > 0 and not 1 <= cfg.run.lock_lease_s <= 86400:
        p.append(f"--run.lock_lease_s: must be between 1 and 86400 seconds, got {cfg.run.lock_lease_s}")
    from elastictrain.snapshot.interval import EveryMinutes

    try:
        EveryMinutes.parse(cfg.checkpoint.every_minutes)
    except ValueError as e:
        p.append(str(e))
    local = cfg.checkpoint.local_every_steps
    if local != "auto" and not (local.isdigit()):
        p.append(f"--checkpoint.local_every_steps: a number of steps >= 0 or 'auto', got {local!r}")
    if cfg.checkpoint.engine_process not in ("auto", "on", "off"):
        p.append(f"--checkpoint.engine_process: 'auto', 'on' or 'off', got {cfg.checkpoint.engine_process!r}")
    if not cfg.checkpoint.local_dir.strip():
        p.append("--checkpoint.local_dir: 'auto', 'none' or a directory, got an empty string")
    if not (math.isfinite(cfg.checkpoint.mtbf_hours) and cfg.checkpoint.mtbf_hours > 0):
        p.append(f"--checkpoint.mtbf_hours: must be a number of hours > 0, got {cfg.checkpoint.mtbf_hours}")
    if not -2**63 <= cfg.run.seed < 2**63:  # torch.manual_seed's range
        p.append(f"--run.seed: must be a 64-bit signed integer (between -2**63 and 2**63-1), got {cfg.run.seed}")
    if not cfg.optim.lr > 0:
        p.append(f"--optim.lr: must be > 0, got {cfg.optim.lr}")
    if not cfg.run.dir.strip():
        p.append("--run.dir: must name a directory (an empty one would write into the working directory)")
    if not 3 <= cfg.preemption.exit_code <= 125:
        p.append(f"--preemption.exit_code: must be between 3 and 125, got {cfg.preemption.exit_code} (0 means "
                 "finished, 1 failed, 2 invalid configuration; 126-255 are the shell's 'cannot run' and "
                 "'killed by a signal')")
    p += _liveness_problems(cfg.dist)
    if cfg.data.num_classes < 2:
        p.append(f"--data.num_classes: must be >= 2 (background + at least one class), got {cfg.data.num_classes}")
    if cfg.checkpoint.keep < 2:
        p.append(f"--checkpoint.keep: must be >= 2 (the newest snapshot may still be in flight), got {cfg.checkpoint.keep}")
    if not 3 <= cfg.model.encoder_depth <= 5:
        p.append(f"--model.encoder_depth: must be 3, 4 or 5, got {cfg.model.encoder_depth}")
    if cfg.model.decoder_channels and len(cfg.model.decoder_channels) != cfg.model.encoder_depth:
        p.append(f"--model.decoder_channels: needs one entry per encoder stage ({cfg.model.encoder_depth}), "
                 f"got {cfg.model.decoder_channels}")
    if cfg.data.image_size % (2 ** cfg.model.encoder_depth):
        p.append(f"--data.image_size: must be divisible by 2**model.encoder_depth = {2 ** cfg.model.encoder_depth}, "
                 f"got {cfg.data.image_size}")
    if cfg.data.source == "generated":
        p += [f"--data.{k}: must be > 0, got {v}" for k, v in
              (("train_samples", cfg.data.train_samples), ("val_samples", cfg.data.val_samples)) if v <= 0]
    elif not cfg.data.root:
        p.append("--data.root: required when --data.source folder")
    if not 0 < cfg.data.val_fraction < 1:
        p.append(f"--data.val_fraction: must be between 0 and 1, got {cfg.data.val_fraction}")
    p += _data_problems(cfg.data)
    if cfg.train.micro_batch_size and cfg.train.batch_size % cfg.train.micro_batch_size:
        p.append(f"--train.micro_batch_size: must divide --train.batch_size ({cfg.train.batch_size}), "
                 f"got {cfg.train.micro_batch_size}")
    if cfg.train.precision == "fp16" and cfg.train.device in ("cpu", "mps"):
        p.append(f"--train.precision: fp16 needs CUDA (GradScaler); use bf16 or fp32 on {cfg.train.device}")
    if cfg.dist.backend == "nccl" and cfg.train.device in ("cpu", "mps"):
        p.append(f"--dist.backend: nccl needs CUDA; use gloo (or auto) on {cfg.train.device}")
    import signal as _signal
    for name in cfg.preemption.signals:
        if not isinstance(getattr(_signal, name, None), _signal.Signals) or name in ("SIGKILL", "SIGSTOP"):
            p.append(f"--preemption.signals: {name!r} is not a catchable signal name (e.g. SIGTERM, SIGUSR1)")
    if cfg.debug.fault:
        from elastictrain.faults import parse_fault
        for spec in cfg.debug.fault.split(","):
            try:
                parse_fault(spec)
            except ValueError as e:
                p.append(f"--debug.fault: {e}")
    return p


def _liveness_problems(d: DistConfig) -> list[str]:
    """Heartbeat, peer and hang timeouts: finite, and a peer timeout that several heartbeats fit in."""
    p = [f"--dist.{k}: must be a number >= 0, got {v}" for k, v in
         (("heartbeat_s", d.heartbeat_s), ("peer_timeout_s", d.peer_timeout_s), ("hang_timeout_s", d.hang_timeout_s))
         if not (math.isfinite(v) and v >= 0)]
    if not p and d.heartbeat_s > 0 and d.peer_timeout_s < 3 * d.heartbeat_s:
        p.append(f"--dist.peer_timeout_s: must be at least 3 x --dist.heartbeat_s ({3 * d.heartbeat_s:g}) so one "
                 f"late heartbeat is no loss, got {d.peer_timeout_s}")
    return p


def _data_problems(data: DataConfig) -> list[str]:
    """Class names, ignore_index and the augmentations."""
    from elastictrain import augment

    p = augment.parse(data.augment)[1]
    names = data.class_names
    if names and len(names) != data.num_classes:
        p.append(f"--data.class_names: needs one name per class ({data.num_classes}, --data.num_classes), "
                 f"got {len(names)}: {names}")
    if len(set(names)) != len(names) or any(not n or "/" in n for n in names):
        p.append(f"--data.class_names: names must be unique, non-empty and free of '/', got {names}")
    if data.ignore_index is not None and 0 <= data.ignore_index < data.num_classes:
        p.append(f"--data.ignore_index: {data.ignore_index} is a class id (0..{data.num_classes - 1}); "
                 "use a value outside them, e.g. 255")
    if data.val_list and data.source != "folder":
        p.append("--data.val_list: only for --data.source folder")
    return p


def save_config(cfg: Config | dict[str, Any], path: Path) -> None:
    """Write a resolved config (or its :func:`to_dict` form) as YAML, atomically (what ``elastictrain predict``
    reads back)."""
    from elastictrain.osutil import write_atomic

    write_atomic(path, yaml.safe_dump(cfg if isinstance(cfg, dict) else to_dict(cfg), sort_keys=False))


def parse_overrides(argv: list[str]) -> tuple[str | None, list[tuple[str, str]], list[str]]:
    """Split argv into (config file, [(dotted key, raw value)], problems)."""
    config_file: str | None = None
    pairs: list[tuple[str, str]] = []
    problems: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            problems.append(f"{arg}: unexpected argument (settings look like --section.key value)")
            i += 1
            continue
        name, eq, inline = arg.partition("=")
        if eq:
            value: str | None = inline
            i += 1
        elif i + 1 < len(argv) and not (argv[i + 1].startswith("--") and len(argv[i + 1]) > 2):
            value = argv[i + 1]
            i += 2
        else:
            value = None
            i += 1
        if value is None:
            problems.append(f"{name}: missing value")
        elif name == "--config":
            config_file = value
        elif name in ALIASES:
            pairs.append((ALIASES[name], value))
        else:
            pairs.append((name[2:], value))
    return config_file, pairs, problems


def load_config(argv: list[str]) -> Config:
    """Build the Config from defaults, ``--config FILE`` and argv overrides.

    Raises:
        ValueError: listing every unknown key, wrong type and impossible value, each with its flag.
        FileNotFoundError: when ``--config`` names a missing file.
    """
    cfg = Config()
    config_file, pairs, problems = parse_overrides(argv)
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"--config: no such file: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"--config: {path} is not valid YAML: {e}") from None
        for key, value in _flatten_yaml(data, str(path), problems):
            _apply(cfg, key, value, from_cli=False, problems=problems)
    for key, value in pairs:
        _apply(cfg, key, value, from_cli=True, problems=problems)
    # Settings that failed to parse kept their (valid) defaults, so validating now reports the
    # remaining problems in the same message instead of one round-trip per mistake.
    problems += validate(cfg)
    if problems:
        raise ValueError("invalid configuration:\n  " + "\n  ".join(problems))
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (primitives only): safe for YAML, JSON, wandb and snapshots."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from :func:`to_dict` output (e.g. the copy stored in a snapshot)."""
    cfg = Config()
    problems: list[str] = []
    for key, value in _flatten_yaml(data, "stored config", problems):
        _apply(cfg, key, value, from_cli=False, problems=problems)
    if problems:
        raise ValueError("stored config does not match this version:\n  " + "\n  ".join(problems))
    return cfg
