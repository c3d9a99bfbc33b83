"""The ``binwslt`` command: find | train | finetune | eval | energy | sweep.

A bare ``binwslt find`` finds a Conv-4 BinW-SLT ticket on scikit-learn's digits (r_p = 0.4, T = 4, λ = 0.99) on a
CPU in a few minutes and prints test accuracy, sparsity, ticket size and energy. Every command takes ``--out DIR``
and writes ``DIR/metrics.json`` (at least ``test_accuracy``, ``prune_rate``, ``sparsity``, ``ticket_bytes``,
``ops_g``, ``energy_mj``, ``seconds``). Multi-process: ``torchrun --nproc_per_node=N -m binwslt.cli find ...``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

from binwslt import models
from binwslt.data import DATASETS

RUN_COMMANDS = ("find", "train", "finetune")
# argparse dest -> RunConfig field, for the options every run command shares
RUN_FIELDS = ("model", "kind", "dataset", "data_dir", "download", "prune_rate", "timesteps", "decay", "threshold",
              "soft_reset", "surrogate", "width", "epochs", "batch_size", "optimizer", "lr", "schedule", "momentum",
              "weight_decay", "seed", "backend", "device", "out", "resume", "overwrite", "progress", "ticket",
              "max_steps", "eval_batches", "eval_batch_size", "stop_after", "threads")
# options finetune takes from its --ticket instead (given explicitly, they would be ignored: refused)
TICKET_FIELDS = ("model", "kind", "prune_rate", "timesteps", "decay", "threshold", "soft_reset", "surrogate",
                 "width")


class CLIError(Exception):
    """A user error the CLI reports as ``binwslt: error: ...`` with exit status 2."""


def _unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _add_model_options(p: argparse.ArgumentParser, kind_default_help: str) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=models.NAMES, help="architecture (default conv4)")
    g.add_argument("--kind", choices=models.KINDS, help=kind_default_help)
    g.add_argument("--prune-rate", dest="prune_rate", type=_unit_float,
                   help="fraction of weights removed, in [0, 1) (default 0.4)")
    g.add_argument("--timesteps", "-T", type=_positive_int, help="timesteps T (default 4)")
    g.add_argument("--decay", type=_unit_float, help="LIF decay rate λ in [0, 1] (default 0.99)")
    g.add_argument("--threshold", type=_unit_float, help="LIF threshold V_th (default 1.0)")
    g.add_argument("--soft-reset", dest="soft_reset", action="store_true", default=None,
                   help="subtract the threshold on a spike instead of resetting to 0")
    g.add_argument("--surrogate", choices=("atan", "sigmoid", "triangle"), help="surrogate gradient (default atan)")
    g.add_argument("--width", type=_unit_float, help="channel multiplier (default 1.0, the paper's models)")
    g.add_argument("--backend", choices=("auto", "torch", "reference", "triton"),
                   help="layer backend (default auto: triton on CUDA, torch on CPU)")


def _add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, help="default digits (bundled, no download)")
    g.add_argument("--data-dir", dest="data_dir", help="folder with the CIFAR python batches (default ./data)")
    g.add_argument("--download", action="store_true", default=None,
                   help="fetch the official CIFAR archive (MD5 checked) when missing")


def _add_run_parser(sub, command: str, help_text: str, kind_help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(command, help=help_text, description=help_text)
    _add_model_options(p, kind_help)
    _add_data_options(p)
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=_positive_int, help="default 10 on digits, 200 on CIFAR")
    g.add_argument("--batch-size", dest="batch_size", type=_positive_int,
                   help="global batch size, split across processes (default 64 digits, 128 CIFAR)")
    g.add_argument("--optimizer", choices=("adam", "sgd"), help="default adam (the paper's)")
    g.add_argument("--lr", type=_unit_float,
                   help="default: find 0.1 (Adam, the paper's; SGD 0.1); train 1e-3 (Adam) / 0.1 (SGD); "
                        "finetune 1e-3 (Adam) / 0.01 (SGD)")
    g.add_argument("--schedule", choices=("cosine", "constant"),
                   help="learning-rate schedule over the epochs (default cosine)")
    g.add_argument("--momentum", type=_unit_float, help="SGD momentum (default 0.9)")
    g.add_argument("--weight-decay", dest="weight_decay", type=_unit_float, help="default 0")
    g.add_argument("--seed", type=_non_negative_int, help="default 0")
    g = p.add_argument_group("run")
    g.add_argument("--out", help=f"output folder (default: a new runs/{command}-MODEL-KIND-DATASET-NNN, "
                                 "linked as runs/latest)")
    g.add_argument("--resume", action="store_true", default=None,
                   help="continue the run in --out from its checkpoint (its settings are reused)")
    g.add_argument("--overwrite", action="store_true", default=None,
                   help="replace the run already in --out (without it a non-empty --out is refused)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bars (they are drawn only on a terminal anyway)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto")
    g.add_argument("--threads", type=_positive_int, help="torch CPU threads per process")
    g.add_argument("--max-steps", dest="max_steps", type=_positive_int, help="cap optimizer steps per epoch")
    g.add_argument("--eval-batches", dest="eval_batches", type=_positive_int, help="cap evaluated test batches")
    g.add_argument("--eval-batch-size", dest="eval_batch_size", type=_positive_int, help="default 256")
    g.add_argument("--stop-after", dest="stop_after", type=_positive_int,
                   help="stop after this many epochs in total (resume later with --resume)")
    if command == "finetune":
        p.add_argument("--ticket", required=True, help="ticket .safetensors or a find run's --out folder")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``binwslt`` command."""
    parser = argparse.ArgumentParser(
        prog="binwslt", description="Binary-weight spiking lottery tickets (BinW-SLT): find, train, fine-tune, "
                                    "evaluate, energy, sweeps.")
    from .cpu import version_line  # the CPU engineer's info line (binwslt/cpu.py)
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_run_parser(sub, "find", "find a binary ticket by training pruning scores only (Algorithm 1)",
                    "binwslt (default) or bnn-binact")
    _add_run_parser(sub, "train", "train a dense baseline (ann or snn)", "snn (default) or ann")
    _add_run_parser(sub, "finetune", "fine-tune a ticket's weights through sign, keeping its mask",
                    "not for finetune: the ticket's kind is used")

    p = sub.add_parser("eval", help="evaluate tickets/models on a dataset; --activations draws Fig. 1 maps")
    p.add_argument("paths", nargs="+", help="ticket/model .safetensors files or run folders")
    _add_data_options(p)
    p.add_argument("--backend", choices=("auto", "torch", "reference", "triton"), help="override the stored one")
    p.add_argument("--activations", action="store_true",
                   help="draw the classifier-input activation maps of the models to OUT/activations.png")
    p.add_argument("--labels", help="comma-separated panel titles for --activations (default: the kinds)")
    p.add_argument("--eval-batch-size", dest="eval_batch_size", type=_positive_int, default=256)
    p.add_argument("--out", default="runs/eval", help="output folder (default runs/eval)")

    p = sub.add_parser("energy", help="per-layer OPs and energy (paper eqs. 6-7) of a model or ticket")
    p.add_argument("path", nargs="?", help="ticket/model file or run folder; without it an untrained model is built")
    _add_model_options(p, "default binwslt")
    p.add_argument("--num-classes", dest="num_classes", type=_positive_int, help="without PATH (default: dataset's)")
    p.add_argument("--in-channels", dest="in_channels", type=_positive_int, help="without PATH and --dataset")
    p.add_argument("--image-size", dest="image_size", type=_positive_int, help="without PATH and --dataset")
    _add_data_options(p)
    p.add_argument("--batch", type=_positive_int, default=256,
                   help="images averaged over (default 256: the first test batch find and eval measure on)")
    p.add_argument("--random-input", dest="random_input", action="store_true",
                   help="measure on N(0, 1) noise instead of test images (default: PATH's run dataset or digits, "
                        "or --dataset; without PATH and --dataset the input is noise)")
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument("--out", default="runs/energy", help="output folder (default runs/energy)")

    p = sub.add_parser("sweep", help="accuracy vs prune rate / timesteps / decay (paper Fig. 2): CSV + PNG")
    p.add_argument("--param", required=True, choices=("prune-rate", "timesteps", "decay"))
    p.add_argument("--values", required=True, help="comma-separated values, e.g. 0.2,0.4,0.6,0.8,0.95")
    p.add_argument("--kinds", default="binwslt,bnn-binact,snn,ann", help="comma-separated kinds (default all four)")
    _add_model_options(p, "use --kinds")
    _add_data_options(p)
    g = p.add_argument_group("optimisation (shared by every run)")
    g.add_argument("--epochs", type=_positive_int)
    g.add_argument("--batch-size", dest="batch_size", type=_positive_int)
    g.add_argument("--optimizer", choices=("adam", "sgd"))
    g.add_argument("--lr", type=_unit_float, help="default: per command (find 0.1, train 1e-3)")
    g.add_argument("--schedule", choices=("cosine", "constant"))
    g.add_argument("--weight-decay", dest="weight_decay", type=_unit_float)
    g.add_argument("--seed", type=_non_negative_int)
    g.add_argument("--device", choices=("auto", "cpu", "cuda"))
    g.add_argument("--threads", type=_positive_int)
    g.add_argument("--max-steps", dest="max_steps", type=_positive_int)
    g.add_argument("--eval-batches", dest="eval_batches", type=_positive_int)
    g.add_argument("--eval-batch-size", dest="eval_batch_size", type=_positive_int)
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("--out", default="runs/sweep", help="output folder (default runs/sweep)")
    from binwslt import reproduce  # binwslt reproduce: the options and the handler live in binwslt/reproduce.py
    reproduce.add_parser(sub)
    from binwslt import export  # binwslt export: the options and the handler live in binwslt/export.py
    export.add_parser(sub)
    return parser


def _explicit(args: argparse.Namespace, fields) -> dict:
    return {name: getattr(args, name) for name in fields if getattr(args, name, None) is not None}


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _say(text: str) -> None:
    if _is_main_process():
        print(text, flush=True)


def _kb(n) -> str:
    return "n/a" if n is None else f"{n / 1024:.1f} KiB"


def _summary(metrics: dict) -> str:
    lines = [f"{metrics.get('command', '')} {metrics.get('model', '')} {metrics.get('kind', '')} on "
             f"{metrics.get('dataset', '')}".strip()]
    if metrics.get("test_accuracy") is not None:
        lines.append(f"  test accuracy  {100 * metrics['test_accuracy']:.2f}%"
                     + (f"  (best {100 * metrics['best_test_accuracy']:.2f}%)"
                        if metrics.get("best_test_accuracy") is not None else ""))
    lines.append(f"  prune rate     {metrics.get('prune_rate')}  sparsity {100 * (metrics.get('sparsity') or 0):.2f}%")
    if metrics.get("ticket_bytes") is not None:
        lines.append(f"  ticket         {_kb(metrics['ticket_bytes'])} ({metrics.get('ticket_path', '')}); dense fp32 "
                     f"{_kb(metrics.get('dense_fp32_bytes'))}")
    lines.append(f"  energy         {metrics['ops_g']:.5f} G OPs, {metrics['energy_mj']:.5f} mJ per image "
                 f"(pruned synapses skipped: {metrics['ops_g_pruned']:.5f} G, {metrics['energy_mj_pruned']:.5f} mJ)")
    lines.append(f"  time           {metrics['seconds']:.1f} s")
    return "\n".join(lines)


def _check_backend_device(backend: Optional[str], device: Optional[str]) -> None:
    """``--backend triton`` runs CUDA tensors only: say so before any work on a machine without a GPU."""
    if backend != "triton" or os.environ.get("TRITON_INTERPRET") == "1":
        return
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        raise CLIError("--backend triton needs CUDA tensors (a GPU)" + (", but --device cpu was given"
                       if device == "cpu" else ", and CUDA is not available here") +
                       ": use --backend torch (or auto) on a CPU")


def _run_command(args: argparse.Namespace) -> dict:
    from binwslt import rundir, train

    explicit = _explicit(args, RUN_FIELDS)
    command = args.command
    if command == "train":
        explicit.setdefault("kind", "snn")
    if command == "finetune":
        ignored = [f for f in TICKET_FIELDS if f in explicit]
        if ignored:
            names = ", ".join("--" + f.replace("_", "-") for f in ignored)
            raise CLIError(f"{names}: finetune takes the model, its neuron and prune rate from --ticket; "
                           "drop these options")
    _check_backend_device(explicit.get("backend"), explicit.get("device"))
    out = explicit.get("out")
    if explicit.get("resume"):
        if out is None:
            raise CLIError("--resume needs --out DIR (the folder of the interrupted run; runs/latest is the last "
                           "run started without --out)")
        if explicit.get("overwrite"):
            raise CLIError("--resume continues the run in --out and --overwrite replaces it: give one of them")
        rundir.check_out(out)
        stored = train.load_checkpoint(os.path.join(out, train.CHECKPOINT_NAME))["config"]
        if stored.get("command") != command:
            raise CLIError(f"--resume: {out} holds a {stored.get('command')!r} run, not {command!r}")
        conflicts = {k: (stored.get(k), v) for k, v in explicit.items()
                     if k not in train.RESUME_FREE_FIELDS and k != "out" and stored.get(k) != v}
        if conflicts:
            raise CLIError(f"--resume: {out} was run with other settings (option: stored, given): {conflicts}; "
                           "drop those options to continue it, or use another --out")
        fields = dict(stored)
        fields.update(explicit)
        fields["out"] = out
        cfg = train.RunConfig(**dict(fields, command=command))
    else:
        fields = dict(explicit)
        cfg = train.RunConfig(**dict(fields, command=command, out=out or "runs"))
        cfg.resolved()  # every option checked before a folder is made
        if out is None:
            cfg.out = rundir.unique_run_folder("runs", f"{command}-{cfg.model}-{cfg.kind}-{cfg.dataset}")
            _say(f"run folder {cfg.out} (runs/latest)")
        else:
            rundir.check_out(out)
    result = train.run(cfg)
    _say(_summary(result.metrics))
    _say(f"  wrote          {os.path.join(cfg.out, train.METRICS_NAME)}")
    return result.metrics


def _load_any(path: str, backend: Optional[str]):
    """A model from a ticket/model .safetensors file or a run folder holding one."""
    from binwslt import train

    if os.path.isdir(path):
        for name in (train.TICKET_NAME, train.DENSE_MODEL_NAME):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise CLIError(f"{path} holds neither {train.TICKET_NAME} nor {train.DENSE_MODEL_NAME}")
    if not os.path.isfile(path):
        raise CLIError(f"{path} does not exist")
    return train.open_ticket(path, backend=backend), path


def _check_fits(model, dataset, path):
    c = model.config
    if (c["in_channels"], c["image_size"], c["num_classes"]) != \
            (dataset.in_channels, dataset.image_size, dataset.num_classes):
        raise CLIError(f"{path} is a model for {c['in_channels']}x{c['image_size']}x{c['image_size']} images and "
                       f"{c['num_classes']} classes; {dataset.name} has {dataset.in_channels}x{dataset.image_size}x"
                       f"{dataset.image_size} and {dataset.num_classes} (choose --dataset)")


def _eval_command(args: argparse.Namespace) -> dict:
    import torch

    from binwslt import energy, ticket, train
    from binwslt.data import load_dataset

    from binwslt import rundir

    start = time.time()
    rundir.check_out(args.out)
    _check_backend_device(args.backend, None)
    dataset = load_dataset(args.dataset or "digits", args.data_dir or "./data", download=bool(args.download))
    loader = dataset.loader("test", args.eval_batch_size, shuffle=False)
    entries, loaded = [], {}
    for path in args.paths:
        model, file_path = _load_any(path, args.backend)
        _check_fits(model, dataset, file_path)
        loss, acc = train.evaluate(model, loader, torch.device("cpu"))
        report = energy.estimate(model, next(iter(loader))[0])
        entry = {"path": file_path, "model": model.config["name"], "kind": model.config["kind"],
                 "dataset": dataset.name, "test_accuracy": acc, "test_loss": loss,
                 "prune_rate": model.config["prune_rate"], "sparsity": models.sparsity(model),
                 "ticket_bytes": os.path.getsize(file_path), "dense_fp32_bytes": ticket.dense_fp32_bytes(model),
                 "ops_g": report.ops_g, "energy_mj": report.energy_mj, "ops_g_pruned": report.ops_g_pruned,
                 "energy_mj_pruned": report.energy_mj_pruned, "seconds": 0.0, "config": model.config}
        entries.append(entry)
        loaded[file_path] = model
        _say(f"{file_path}: {entry['kind']} {entry['model']} test accuracy {100 * acc:.2f}%, sparsity "
             f"{100 * entry['sparsity']:.2f}%, {entry['ops_g']:.5f} G OPs, {entry['energy_mj']:.5f} mJ")
    metrics = dict(entries[0], command="eval", models=entries)
    if args.activations:
        from binwslt.activations import plot_activation_maps

        labels = args.labels.split(",") if args.labels else None
        if labels is not None and len(labels) != len(entries):
            raise CLIError(f"--labels has {len(labels)} titles for {len(entries)} models")
        if labels is None:
            from binwslt.sweep import KIND_LABELS
            labels = [KIND_LABELS.get(e["kind"], e["kind"]) for e in entries]
        if len(set(labels)) != len(labels):
            labels = [f"{label} ({i + 1})" for i, label in enumerate(labels)]
        panels = {label: loaded[e["path"]] for label, e in zip(labels, entries)}
        png = os.path.join(args.out, "activations.png")
        plot_activation_maps(panels, next(iter(loader))[0], png)
        metrics["activations_png"] = png
        _say(f"activation maps: {png}")
    metrics["seconds"] = time.time() - start
    _write(args.out, metrics)
    return metrics


def _run_dataset(path: str) -> Optional[str]:
    """The dataset a run folder's metrics.json names (None for a file, or a folder without one)."""
    import json

    from binwslt import train

    metrics_path = os.path.join(path, train.METRICS_NAME)
    if not os.path.isdir(path) or not os.path.isfile(metrics_path):
        return None
    try:
        with open(metrics_path, encoding="utf-8") as f:
            name = json.load(f).get("dataset")
    except (OSError, ValueError, AttributeError):
        return None
    return name if name in DATASETS else None


def _energy_command(args: argparse.Namespace) -> dict:
    import torch

    from binwslt import energy, rundir, ticket
    from binwslt.config import LIFConfig
    from binwslt.data import load_dataset

    start = time.time()
    rundir.check_out(args.out)
    _check_backend_device(args.backend, None)
    torch.manual_seed(args.seed)
    if args.path:
        if any(v is not None for v in (args.model, args.kind, args.prune_rate, args.timesteps, args.decay,
                                       args.threshold, args.soft_reset, args.surrogate, args.width,
                                       args.num_classes, args.in_channels, args.image_size)):
            raise CLIError("with PATH the model comes from the file: drop the model options (--model, --kind, "
                           "--prune-rate, ...)")
        model, path = _load_any(args.path, args.backend)
        ticket_bytes = os.path.getsize(path)
        # the run's own dataset, else digits (the default dataset) when the model fits it
        dataset_name = args.dataset or _run_dataset(args.path) or "digits"
    else:
        neuron = LIFConfig(decay=0.99 if args.decay is None else args.decay,
                           threshold=1.0 if args.threshold is None else args.threshold,
                           v_reset=None if args.soft_reset else 0.0, surrogate=args.surrogate or "atan")
        dataset_name = args.dataset
        shape_given = dataset_name is not None
        dataset = load_dataset(dataset_name, args.data_dir or "./data", download=bool(args.download)) \
            if shape_given else None
        model = models.build(
            args.model or "conv4", args.kind or "binwslt",
            num_classes=args.num_classes or (dataset.num_classes if dataset else 10),
            in_channels=args.in_channels or (dataset.in_channels if dataset else 3),
            image_size=args.image_size or (dataset.image_size if dataset else 32),
            prune_rate=0.4 if args.prune_rate is None else args.prune_rate, timesteps=args.timesteps or 4,
            neuron=neuron, backend=args.backend or "auto", width=1.0 if args.width is None else args.width)
        path, ticket_bytes = None, None
    c = model.config
    dataset = None
    if dataset_name is not None and not args.random_input:
        dataset = load_dataset(dataset_name, args.data_dir or "./data", download=bool(args.download))
        _check_fits(model, dataset, path or "the built model")
        x = next(iter(dataset.loader("test", args.batch, shuffle=False)))[0]
        measured = f"the first {x.shape[0]} test images of {dataset.name}"
    else:
        x = torch.randn(args.batch, c["in_channels"], c["image_size"], c["image_size"])
        measured = (f"{args.batch} random N(0, 1) images of {c['in_channels']}x{c['image_size']}x{c['image_size']}"
                    + ("" if args.random_input else " (no --dataset given)"))
    report = energy.estimate(model, x)
    _say(f"measured on {measured} (firing rates, and so SOPs, depend on the input)")
    _say(report.table())
    metrics = {"command": "energy", "model": c["name"], "kind": c["kind"], "path": path,
               "dataset": dataset.name if dataset else None, "input": "test images" if dataset else "randn",
               "measured_on": measured, "images": int(x.shape[0]),
               "test_accuracy": None, "prune_rate": c["prune_rate"], "sparsity": models.sparsity(model),
               "ticket_bytes": ticket_bytes, "dense_fp32_bytes": ticket.dense_fp32_bytes(model),
               "ops_g": report.ops_g, "energy_mj": report.energy_mj, "ops_g_pruned": report.ops_g_pruned,
               "energy_mj_pruned": report.energy_mj_pruned, "flops_g": report.flops_g, "config": c,
               "report": report.to_dict(), "seconds": time.time() - start}
    _write(args.out, metrics)
    return metrics


def _parse_values(text: str, param: str) -> List:
    values = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            values.append(int(item) if param == "timesteps" else float(item))
        except ValueError:
            raise CLIError(f"--values: {item!r} is not a{'n integer' if param == 'timesteps' else ' number'}") \
                from None
    if not values:
        raise CLIError("--values is empty")
    return values


SWEEP_FIELDS = ("model", "dataset", "data_dir", "download", "prune_rate", "timesteps", "decay", "threshold",
                "soft_reset", "surrogate", "width", "backend", "epochs", "batch_size", "optimizer", "lr", "schedule",
                "weight_decay", "seed", "device", "threads", "max_steps", "eval_batches", "eval_batch_size",
                "progress")


def _sweep_command(args: argparse.Namespace) -> dict:
    from binwslt import rundir
    from binwslt.sweep import PARAMS, run_sweep

    start = time.time()
    rundir.check_out(args.out)
    _check_backend_device(args.backend, args.device)
    values = _parse_values(args.values, args.param)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    base = _explicit(args, SWEEP_FIELDS)
    swept = PARAMS[args.param]
    if swept in base:
        raise CLIError(f"--{args.param} is the swept parameter: give its values with --values only")
    result = run_sweep(args.param, values, kinds, base, args.out)
    _say(f"sweep {args.param}: {len(result.rows)} runs -> {result.csv_path}, {result.png_path}")
    for row in result.rows:
        value = "base" if row["value"] == "" else row["value"]
        _say(f"  {row['kind']:<11} {args.param}={value}: test accuracy {100 * row['test_accuracy']:.2f}%")
    first = result.rows[0]
    metrics = {"command": "sweep", "param": args.param, "values": values, "kinds": kinds,
               "csv": result.csv_path, "png": result.png_path, "rows": result.rows,
               "test_accuracy": first["test_accuracy"], "prune_rate": first["prune_rate"],
               "sparsity": first["sparsity"], "ticket_bytes": first["ticket_bytes"], "ops_g": first["ops_g"],
               "energy_mj": first["energy_mj"], "seconds": time.time() - start}
    _write(args.out, metrics)
    return metrics


def _write(out: str, metrics: dict) -> None:
    from binwslt.train import write_metrics

    if _is_main_process():
        path = write_metrics(out, metrics)
        print(f"wrote {path}", flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``binwslt`` console script; returns the exit status (0 ok, 2 usage or input error).

    Input errors print one line; set ``BINWSLT_DEBUG=1`` for the traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"find": _run_command, "train": _run_command, "finetune": _run_command, "eval": _eval_command,
                "energy": _energy_command, "sweep": _sweep_command,
                "reproduce": lambda a: __import__("binwslt.reproduce", fromlist=["command"]).command(a),
                "export": lambda a: __import__("binwslt.export", fromlist=["export_command"]).export_command(a)}
    try:
        handlers[args.command](args)
    except (CLIError, ValueError, TypeError, OSError) as exc:  # OSError: a file or folder that cannot be used
        if os.environ.get("BINWSLT_DEBUG") == "1":
            raise
        print(f"binwslt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"binwslt {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"binwslt {args.command}: interrupted (continue with --resume and the same --out)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
