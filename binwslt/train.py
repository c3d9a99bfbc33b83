"""Training loops: ``find`` (Algorithm 1: scores only), ``train`` (dense baselines), ``finetune`` (a ticket's weights).

* ``find`` — for ``binwslt`` and ``bnn-binact`` (MPT-1/1): the random weights stay frozen; the pruning scores
  (and the BatchNorm affine parameters) are trained with MPT's straight-through rule. Adam with lr 0.1, as the
  paper says, by default; SGD with a cosine schedule (MPT's choice) with ``optimizer="sgd"``.
* ``train`` — the dense ``ann`` and ``snn`` baselines: all weights trained (surrogate gradients for the SNN).
* ``finetune`` — start from a found ticket, keep its mask (scores frozen) and train the latent weights through
  sign with a straight-through estimator, dL/dw = dL/dW_eff · α · M (the paper's Fig. 3 right). The fused
  layers' weight gradient exists on the ``reference`` and ``torch`` backends.

The loss is cross-entropy on the logits, which spiking models average over T. A run writes ``OUT/checkpoint.pt``
atomically (temp file + rename) after every epoch, ``OUT/ticket.safetensors`` (binary kinds) or
``OUT/model.safetensors`` (dense kinds) at the end, and ``OUT/metrics.json``. ``resume=True`` continues from
the checkpoint exactly: the loader's shuffling and augmentation depend only on (seed, epoch), and the model,
optimizer, scheduler and RNG states are restored. Under ``torchrun`` the loops run with DistributedDataParallel
(nccl on GPUs, gloo on CPU); BatchNorm statistics stay per process, as DDP does by default.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from binwslt import models
from binwslt.config import LIFConfig
from binwslt.convert import find_parameters, finetune_parameters
from binwslt.data import DATASETS, load_dataset
from binwslt.rundir import RunFolderError, RunLock, check_out, clean_temp_files, run_files

COMMANDS = ("find", "train", "finetune")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("cosine", "constant")
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.json"
TICKET_NAME = "ticket.safetensors"
DENSE_MODEL_NAME = "model.safetensors"
CHECKPOINT_FORMAT = "binwslt-checkpoint"
# a checkpoint file is this header, the SHA-256 of the payload in hex, a newline, then the torch.save payload
CHECKPOINT_MAGIC = b"binwslt-checkpoint sha256 "
# the files a run writes in its folder (removed first by overwrite=True)
RUN_OUTPUTS = (CHECKPOINT_NAME, METRICS_NAME, TICKET_NAME, DENSE_MODEL_NAME)
# default learning rates per (command, optimizer): the paper's Adam 0.1 for finding scores; the usual rates for
# training dense weights (Adam at 0.1 diverges on weights) and for fine-tuning latent weights.
DEFAULT_LR = {("find", "adam"): 0.1, ("find", "sgd"): 0.1, ("train", "adam"): 1e-3, ("train", "sgd"): 0.1,
              ("finetune", "adam"): 1e-3, ("finetune", "sgd"): 0.01}
DEFAULT_EPOCHS = {"digits": 10, "cifar10": 200, "cifar100": 200}
DEFAULT_BATCH = {"digits": 64, "cifar10": 128, "cifar100": 128}
# fields that may differ between an interrupted run and its resumption
RESUME_FREE_FIELDS = ("resume", "overwrite", "progress", "stop_after", "data_dir", "download", "device", "threads")


def command_for_kind(kind: str) -> str:
    """``"find"`` for the binary kinds (binwslt, bnn-binact), ``"train"`` for the dense ones (ann, snn)."""
    if kind not in models.KINDS:
        raise ValueError(f"kind must be one of {', '.join(models.KINDS)}; got {kind!r}")
    return "find" if kind in models.BINARY_KINDS else "train"


@dataclass
class RunConfig:
    """Everything a find/train/finetune run depends on (stored in checkpoints and metrics.json).

    ``lr``/``schedule``/``epochs``/``batch_size`` of None take the defaults for the command, optimizer and
    dataset (see :meth:`resolved`): cosine decay over the epochs for both optimizers (with Adam at lr 0.1 a
    constant rate leaves the scores churning: 92% on digits after 3 epochs, 98.6% after 10 with cosine).
    ``batch_size`` is global: under DDP each of W processes takes ``batch_size / W``. ``ticket`` (finetune
    only) is a ticket file or a run folder holding one; the model's kind, shape and neuron then come from the
    ticket. ``max_steps`` caps optimizer steps per epoch and
    ``eval_batches`` the test batches (of ``eval_batch_size``) evaluated (both for quick checks); the energy
    figures come from the first test batch. ``stop_after`` ends the run after that many completed epochs as if
    interrupted (the checkpoint lets ``resume`` continue). ``threads`` sets ``torch.set_num_threads`` (on a
    shared, oversubscribed CPU one thread per process is often much faster than two).

    ``out`` is locked while the run uses it (another process gets an error naming this one's pid). A run without
    ``resume`` refuses a folder that already holds files unless ``overwrite`` (which removes the previous run's
    outputs first). ``progress`` bars are drawn only when stderr is a terminal; every epoch also prints one line.
    """

    command: str = "find"
    model: str = "conv4"
    kind: str = "binwslt"
    dataset: str = "digits"
    data_dir: str = "./data"
    download: bool = False
    prune_rate: float = 0.4
    timesteps: int = 4
    decay: float = 0.99
    threshold: float = 1.0
    soft_reset: bool = False
    surrogate: str = "atan"
    width: float = 1.0
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    optimizer: str = "adam"
    lr: Optional[float] = None
    schedule: Optional[str] = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    backend: str = "auto"
    device: str = "auto"
    out: str = "runs/find"
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    ticket: Optional[str] = None
    max_steps: Optional[int] = None
    eval_batches: Optional[int] = None
    eval_batch_size: int = 256
    stop_after: Optional[int] = None
    threads: Optional[int] = None

    def resolved(self) -> "RunConfig":
        """A copy with the per-command/dataset defaults filled in, after checking every field."""
        cfg = dataclasses.replace(self)
        if cfg.command not in COMMANDS:
            raise ValueError(f"command must be one of {', '.join(COMMANDS)}; got {cfg.command!r}")
        if cfg.model not in models.NAMES:
            raise ValueError(f"model must be one of {', '.join(models.NAMES)}; got {cfg.model!r}")
        if cfg.kind not in models.KINDS:
            raise ValueError(f"kind must be one of {', '.join(models.KINDS)}; got {cfg.kind!r}")
        if cfg.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; got {cfg.dataset!r}")
        if cfg.command == "find" and cfg.kind not in models.BINARY_KINDS:
            raise ValueError(f"find searches binary tickets: kind must be one of {', '.join(models.BINARY_KINDS)}, "
                             f"got {cfg.kind!r} (use train for the dense baselines)")
        if cfg.command == "train" and cfg.kind in models.BINARY_KINDS:
            raise ValueError(f"train trains dense weights: kind must be ann or snn, got {cfg.kind!r} "
                             f"(use find for {cfg.kind}, finetune to train a ticket's weights)")
        if cfg.command == "finetune" and not cfg.ticket:
            raise ValueError("finetune needs ticket=PATH (a ticket .safetensors file or a find run's folder)")
        if cfg.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {cfg.optimizer!r}")
        if cfg.schedule is None:
            cfg.schedule = "cosine"
        if cfg.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {cfg.schedule!r}")
        if cfg.lr is None:
            cfg.lr = DEFAULT_LR[(cfg.command, cfg.optimizer)]
        if cfg.epochs is None:
            cfg.epochs = DEFAULT_EPOCHS[cfg.dataset]
        if cfg.batch_size is None:
            cfg.batch_size = DEFAULT_BATCH[cfg.dataset]
        for name in ("epochs", "batch_size", "timesteps"):
            _check_int(name, getattr(cfg, name), 1)
        _check_int("seed", cfg.seed, 0)
        _check_int("eval_batch_size", cfg.eval_batch_size, 1)
        for name in ("max_steps", "eval_batches", "stop_after", "threads"):
            if getattr(cfg, name) is not None:
                _check_int(name, getattr(cfg, name), 1)
        for name in ("lr", "momentum", "weight_decay", "prune_rate", "decay", "threshold", "width"):
            value = getattr(cfg, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if cfg.lr <= 0:
            raise ValueError(f"lr must be > 0, got {cfg.lr!r}")
        if cfg.weight_decay < 0 or cfg.momentum < 0:
            raise ValueError(f"weight_decay and momentum must be >= 0, got {cfg.weight_decay!r}, {cfg.momentum!r}")
        if not 0.0 <= cfg.prune_rate < 1.0:
            raise ValueError(f"prune_rate must be in [0, 1), got {cfg.prune_rate!r}")
        if cfg.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda; got {cfg.device!r}")
        if not isinstance(cfg.out, str) or not cfg.out:
            raise ValueError(f"out must be a folder path, got {cfg.out!r}")
        if cfg.resume and cfg.overwrite:
            raise ValueError("resume and overwrite exclude each other: resume continues the run in out, overwrite "
                             "replaces it")
        self_neuron = cfg.neuron()  # validates decay, threshold, surrogate
        del self_neuron
        return cfg

    def neuron(self) -> LIFConfig:
        """The LIF neuron these fields describe (hard reset to 0 unless ``soft_reset``)."""
        return LIFConfig(decay=self.decay, threshold=self.threshold, v_reset=None if self.soft_reset else 0.0,
                         surrogate=self.surrogate)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunResult:
    """What :func:`run` returns: the metrics (also in OUT/metrics.json) and the trained model (unwrapped)."""

    metrics: dict
    model: nn.Module
    history: List[dict] = field(default_factory=list)


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


# --------------------------------------------------------------------------------------------- distributed


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_kind: str) -> _Dist:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1); single process otherwise."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
        owns = True
    return _Dist(rank=rank, world_size=world, local_rank=local_rank, owns_group=owns)


def _all_sum(values: List[float], dist_info: _Dist, device) -> List[float]:
    if dist_info.world_size == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _barrier(dist_info: _Dist) -> None:
    if dist_info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


# ----------------------------------------------------------------------------------------------- checkpoints


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str, write) -> None:
    """Call ``write(fileobj)`` on a temp file beside ``path``, fsync, then rename it over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path: str, state: dict) -> None:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) to ``path`` atomically with ``torch.save``,
    behind a header with the payload's SHA-256 that :func:`load_checkpoint` verifies."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    header = CHECKPOINT_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n"

    def write(f):
        f.write(header)
        f.write(payload)

    atomic_write_bytes(path, write)


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`, after verifying its checksum.

    FileNotFoundError when there is none; ValueError naming the file when it is empty, truncated, corrupt or not
    a binwslt checkpoint. ``weights_only``: no arbitrary code is run.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}: nothing to resume (run without --resume first)")
    with open(path, "rb") as f:
        data = f.read()
    head = len(CHECKPOINT_MAGIC) + 65
    if not data.startswith(CHECKPOINT_MAGIC) or len(data) < head or data[head - 1:head] != b"\n":
        what = "is empty" if not data else "has no binwslt checksum header (not a binwslt checkpoint, or corrupt)"
        raise ValueError(f"checkpoint {path} {what}: it cannot be resumed")
    expected, payload = data[len(CHECKPOINT_MAGIC):head - 1].decode("ascii", "replace"), data[head:]
    if hashlib.sha256(payload).hexdigest() != expected:
        raise ValueError(f"checkpoint {path} is corrupt (its SHA-256 does not match the one it was written with): "
                         "it cannot be resumed")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # a payload that hashes right but torch cannot read (written by a foreign tool)
        raise ValueError(f"checkpoint {path} cannot be read: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a binwslt checkpoint")
    return state


def write_metrics(out: str, metrics: dict) -> str:
    """Write ``metrics`` to ``OUT/metrics.json`` atomically; return the path."""
    path = os.path.join(out, METRICS_NAME)
    text = json.dumps(metrics, indent=2, sort_keys=True, default=float).encode()
    atomic_write_bytes(path, lambda f: f.write(text))
    return path


# ------------------------------------------------------------------------------------------------ the loops


def _device(cfg: RunConfig, dist_info: _Dist) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' but CUDA is not available")
        return torch.device("cuda", dist_info.local_rank)
    return torch.device("cpu")


def resolve_ticket_path(path: str) -> str:
    """A ticket file, or the ticket inside a run folder; FileNotFoundError naming what was looked for."""
    if os.path.isdir(path):
        candidate = os.path.join(path, TICKET_NAME)
        if not os.path.isfile(candidate):
            raise FileNotFoundError(f"{path} is a folder without {TICKET_NAME}; pass a ticket file or a find "
                                    "run's --out folder")
        return candidate
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ticket {path} does not exist")
    return path


def _from_ticket(path: str, read, **kwargs):
    """``read(path, **kwargs)`` (``binwslt.ticket.load`` or ``.read_config``); a damaged file fails anywhere in
    parsing, so every error but a missing file becomes one ValueError naming the file."""
    try:
        return read(path, **kwargs)
    except FileNotFoundError:
        raise
    except Exception as exc:
        if isinstance(exc, ValueError) and str(path) in str(exc):
            raise
        raise ValueError(f"{path} is not a readable binwslt ticket/model ({type(exc).__name__}: {exc})") from None


def open_ticket(path: str, backend: Optional[str] = None) -> nn.Module:
    """``binwslt.ticket.load(path, backend=backend)``, with any damage to the file reported as one ValueError
    naming it (FileNotFoundError when it is missing)."""
    from binwslt import ticket

    return _from_ticket(path, ticket.load, backend=backend)


def build_model(cfg: RunConfig, dataset) -> nn.Module:
    """The model a run trains: built from ``cfg`` (find/train) or loaded from ``cfg.ticket`` (finetune)."""
    if cfg.command == "finetune":
        from binwslt import ticket

        model = open_ticket(resolve_ticket_path(cfg.ticket), backend=cfg.backend)
        mc = model.config
        if (mc["in_channels"], mc["image_size"], mc["num_classes"]) != \
                (dataset.in_channels, dataset.image_size, dataset.num_classes):
            raise ValueError(f"ticket {cfg.ticket} is for {mc['in_channels']}x{mc['image_size']}x{mc['image_size']}"
                             f" images and {mc['num_classes']} classes; {cfg.dataset} has "
                             f"{dataset.in_channels}x{dataset.image_size}x{dataset.image_size} and "
                             f"{dataset.num_classes}")
        if mc["kind"] not in models.BINARY_KINDS:
            raise ValueError(f"finetune needs a binary ticket (binwslt or bnn-binact), {cfg.ticket} holds a "
                             f"{mc['kind']} model")
        model.train()
        return model
    return models.build(cfg.model, cfg.kind, num_classes=dataset.num_classes, in_channels=dataset.in_channels,
                        image_size=dataset.image_size, prune_rate=cfg.prune_rate, timesteps=cfg.timesteps,
                        neuron=cfg.neuron(), backend=cfg.backend, width=cfg.width)


def trainable_parameters(model: nn.Module, command: str) -> List[nn.Parameter]:
    """Set ``requires_grad`` for ``command`` and return the trained parameters, in module order.

    find: :func:`binwslt.nn.find_parameters` (scores, BN affine, biases; never the frozen random weights).
    train: everything. finetune: :func:`binwslt.nn.finetune_parameters` (latent weights through sign, BN,
    biases; scores frozen, so the mask stays the ticket's).
    """
    rules = {"find": find_parameters, "finetune": finetune_parameters, "train": lambda m: list(m.parameters())}
    if command not in rules:
        raise ValueError(f"command must be one of {sorted(rules)}, got {command!r}")
    params = rules[command](model)
    trained = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)
    return params


def _step(optimizer, params) -> None:
    """``optimizer.step()``, then each parameter's version counter bumped: torch's fused steps update in place
    without it, and the layers' SubnetCache recomputes only when the scores' version changes."""
    optimizer.step()
    if optimizer.defaults.get("fused"):
        for p in params:
            torch.autograd.graph.increment_version(p)


def _optimizer(cfg: RunConfig, params):
    # torch's fused CPU step: one pass per tensor instead of a loop of eager ops (Adam 40x faster on Conv-4);
    # it leaves the version counters alone, which `_step` bumps
    fused = {"fused": True} if all(p.device.type == "cpu" and p.is_floating_point() for p in params) else {}
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **fused)


def _scheduler(cfg: RunConfig, optimizer):
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    return None


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, max_batches: Optional[int] = None):
    """Mean cross-entropy and accuracy of ``model`` (eval mode) over ``loader``; returns ``(loss, accuracy)``."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        count += int(y.numel())
    model.train(was_training)
    if count == 0:
        raise ValueError("evaluate: the loader gave no samples")
    return loss_sum / count, correct / count


def _volatile_free(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in RESUME_FREE_FIELDS}


# RunConfig fields finetune takes from its ticket, and where the ticket's model config keeps them
TICKET_FIELDS = {"model": ("name",), "kind": ("kind",), "prune_rate": ("prune_rate",), "timesteps": ("timesteps",),
                 "decay": ("neuron", "decay"), "threshold": ("neuron", "threshold"),
                 "surrogate": ("neuron", "surrogate"), "width": ("width",)}


def _with_ticket_fields(cfg: RunConfig) -> RunConfig:
    """finetune: the model fields from the ticket (so metrics.json records what ran). ValueError when ``cfg``
    sets one of them to something other than the default and the ticket's value (it would be ignored)."""
    from binwslt import ticket

    stored = _from_ticket(resolve_ticket_path(cfg.ticket), ticket.read_config)
    if not isinstance(stored, dict):
        raise ValueError(f"{cfg.ticket} holds no model config: not a binwslt ticket")
    defaults = RunConfig()
    values = {}
    for name, keys in TICKET_FIELDS.items():
        value = stored
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            values[name] = value
    values["soft_reset"] = stored.get("neuron", {}).get("v_reset", 0.0) is None
    ignored = {name: (getattr(cfg, name), value) for name, value in values.items()
               if getattr(cfg, name) != getattr(defaults, name) and getattr(cfg, name) != value}
    if ignored:
        raise ValueError(f"finetune takes the model from its ticket {cfg.ticket}; these settings would be ignored "
                         f"(field: given, ticket's): {ignored}")
    return dataclasses.replace(cfg, **values)


def run(cfg: RunConfig) -> RunResult:
    """Run ``cfg.command`` end to end; see the module docstring. Returns :class:`RunResult`.

    Rank 0 writes OUT/checkpoint.pt every epoch, the ticket/model file and OUT/metrics.json at the end.
    """
    cfg = cfg.resolved()
    if cfg.command == "finetune":
        cfg = _with_ticket_fields(cfg)
    check_out(cfg.out)  # before any work: a file, or an unwritable folder, fails now and not after an epoch
    start = time.time()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    probe_device = "cuda" if (cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())) \
        else "cpu"
    dist_info = _init_distributed(probe_device)
    lock = None
    try:
        if dist_info.main:
            lock = _claim_out(cfg)
        _barrier(dist_info)
        return _run(cfg, dist_info, start)
    finally:
        if lock is not None:
            lock.release()
        if dist_info.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _claim_out(cfg: RunConfig) -> RunLock:
    """Lock ``cfg.out``, remove interrupted writes' temp files, and refuse (or, with overwrite, clear) a folder
    that already holds a run when not resuming. Returns the held lock."""
    lock = RunLock(cfg.out)
    try:
        clean_temp_files(cfg.out)
        existing = run_files(cfg.out)
        if existing and not cfg.resume:
            if not cfg.overwrite:
                shown = ", ".join(existing[:4]) + (", ..." if len(existing) > 4 else "")
                raise RunFolderError(f"--out {cfg.out} already holds files ({shown}): add --resume to continue "
                                     "that run, --overwrite to replace it, or choose another --out")
            for name in RUN_OUTPUTS:
                if os.path.isfile(os.path.join(cfg.out, name)):
                    os.unlink(os.path.join(cfg.out, name))
    except BaseException:
        lock.release()
        raise
    return lock


def _run(cfg: RunConfig, dist_info: _Dist, start: float) -> RunResult:
    from tqdm.auto import tqdm

    device = _device(cfg, dist_info)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.batch_size % dist_info.world_size:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the {dist_info.world_size} processes")
    # rank 0 reads (and, with download, fetches) the data first; the others read it once it is in place
    dataset = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download) if dist_info.main else None
    _barrier(dist_info)
    if dataset is None:
        dataset = load_dataset(cfg.dataset, cfg.data_dir)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, dataset).to(device)
    params = trainable_parameters(model, cfg.command)
    optimizer = _optimizer(cfg, params)
    scheduler = _scheduler(cfg, optimizer)
    checkpoint_path = os.path.join(cfg.out, CHECKPOINT_NAME)
    history: List[dict] = []
    first_epoch, best = 0, 0.0
    if cfg.resume:
        state = load_checkpoint(checkpoint_path)
        stored = state["config"]
        # a moved run folder is the same run: "out" may differ
        diffs = {k: (stored.get(k), v) for k, v in _volatile_free(cfg.to_dict()).items()
                 if k != "out" and stored.get(k) != v}
        if diffs:
            raise ValueError(f"--resume: {checkpoint_path} was written by a run with different settings "
                             f"(field: checkpoint value, requested value): {diffs}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        first_epoch, best, history = int(state["epoch"]), float(state["best_test_accuracy"]), list(state["history"])
        torch.set_rng_state(state["rng"])

    net = model
    if dist_info.world_size > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    per_rank_batch = cfg.batch_size // dist_info.world_size
    train_loader = dataset.loader("train", per_rank_batch, shuffle=True, seed=cfg.seed, rank=dist_info.rank,
                                  world_size=dist_info.world_size, drop_last=False)
    test_loader = dataset.loader("test", cfg.eval_batch_size, shuffle=False)
    # bars only on a terminal (a log file gets the plain per-epoch lines below)
    show = cfg.progress and dist_info.main and sys.stderr.isatty()
    kind = model.config["kind"]  # finetune: the ticket's kind, whatever cfg.kind says
    last_epoch = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, cfg.stop_after)
    for epoch in range(first_epoch, last_epoch):
        model.train()
        train_loader.set_epoch(epoch)
        steps = len(train_loader) if cfg.max_steps is None else min(len(train_loader), cfg.max_steps)
        bar = tqdm(total=steps, desc=f"{cfg.command} {kind} epoch {epoch + 1}/{cfg.epochs}", disable=not show,
                   leave=False, dynamic_ncols=True)
        loss_sum, correct, count, epoch_start = 0.0, 0, 0, time.time()
        for step, (x, y) in enumerate(train_loader):
            if step >= steps:
                break
            if y.numel() == 0:  # an empty batch would only touch BatchNorm's running statistics: skip it
                if dist_info.world_size > 1:  # skipping on one process alone would leave the others waiting
                    raise ValueError(f"process {dist_info.rank} got an empty training batch: use fewer "
                                     "processes or a larger batch_size")
                continue
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            _step(optimizer, params)
            loss_sum += float(loss.detach()) * y.numel()
            correct += int((logits.detach().argmax(1) == y).sum())
            count += int(y.numel())
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / count:.4f}", acc=f"{correct / count:.4f}",
                            img_s=f"{count * dist_info.world_size / max(time.time() - epoch_start, 1e-9):.0f}")
        bar.close()
        lr = optimizer.param_groups[0]["lr"]
        if scheduler is not None:
            scheduler.step()
        loss_sum, correct, count = _all_sum([loss_sum, correct, count], dist_info, device)
        if count == 0:
            raise ValueError(f"epoch {epoch + 1} had no training samples ({cfg.dataset} train split)")
        test_loss, test_acc = evaluate(model, test_loader, device, cfg.eval_batches)
        best = max(best, test_acc)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / count, "train_accuracy": correct / count,
                  "test_loss": test_loss, "test_accuracy": test_acc, "lr": lr,
                  "seconds": time.time() - epoch_start}
        history.append(record)
        if dist_info.main:  # one line per epoch even without progress bars, so logs show the run's course
            tqdm.write(f"{cfg.command} {kind} epoch {epoch + 1}/{cfg.epochs}: train loss "
                       f"{record['train_loss']:.4f} acc {record['train_accuracy']:.4f} | test acc {test_acc:.4f} | "
                       f"{record['seconds']:.1f}s", file=sys.stdout)
        if dist_info.main:
            save_checkpoint(checkpoint_path, {
                "format": CHECKPOINT_FORMAT, "version": 1, "config": cfg.to_dict(), "epoch": epoch + 1,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "best_test_accuracy": best, "history": history, "rng": torch.get_rng_state()})
        _barrier(dist_info)

    metrics = _final_metrics(cfg, model, dataset, test_loader, device, history, best, start, dist_info)
    return RunResult(metrics=metrics, model=model, history=history)


def _final_metrics(cfg, model, dataset, test_loader, device, history, best, start, dist_info) -> dict:
    from binwslt import energy, ticket

    if history:
        test_acc = history[-1]["test_accuracy"]
    else:
        test_acc = evaluate(model, test_loader, device, cfg.eval_batches)[1]
    x = next(iter(test_loader))[0].to(device)
    report = energy.estimate(model, x)
    kind = model.config["kind"]
    artefact = os.path.join(cfg.out, TICKET_NAME if kind in models.BINARY_KINDS else DENSE_MODEL_NAME)
    ticket_bytes = None
    if dist_info.main:
        ticket_bytes = ticket.save(model, artefact)
    finished = cfg.stop_after is None or cfg.stop_after >= cfg.epochs
    metrics = {
        "command": cfg.command, "model": model.config["name"], "kind": kind, "dataset": cfg.dataset,
        "test_accuracy": test_acc, "best_test_accuracy": max(best, test_acc),
        "train_accuracy": history[-1]["train_accuracy"] if history else None,
        "train_loss": history[-1]["train_loss"] if history else None,
        "prune_rate": model.config["prune_rate"], "sparsity": models.sparsity(model),
        "timesteps": model.config["timesteps"], "decay": model.config["neuron"]["decay"],
        "ticket_bytes": ticket_bytes, "ticket_path": artefact, "dense_fp32_bytes": ticket.dense_fp32_bytes(model),
        "weights": models.weight_count(model), "ops_g": report.ops_g, "energy_mj": report.energy_mj,
        "ops_g_pruned": report.ops_g_pruned, "energy_mj_pruned": report.energy_mj_pruned,
        "epochs": len(history), "finished": finished, "seconds": time.time() - start,
        "world_size": dist_info.world_size, "device": str(device), "torch": torch.__version__,
        "config": cfg.to_dict(), "history": history,
    }
    if dist_info.main:
        write_metrics(cfg.out, metrics)
    return metrics


def find(**kwargs) -> RunResult:
    """``run(RunConfig(command="find", **kwargs))``."""
    return run(RunConfig(command="find", **kwargs))


def train(**kwargs) -> RunResult:
    """``run(RunConfig(command="train", **kwargs))``; ``kind`` defaults to "snn"."""
    kwargs.setdefault("kind", "snn")
    return run(RunConfig(command="train", **kwargs))


def finetune(**kwargs) -> RunResult:
    """``run(RunConfig(command="finetune", **kwargs))``; needs ``ticket=PATH``."""
    return run(RunConfig(command="finetune", **kwargs))
