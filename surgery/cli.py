"""`surgery` command line: a thin layer over the Python API (parse, call, print).

Exit codes: 0 success, 2 bad usage or input (SurgeryError), 1 failure (e.g. ONNX parity, or
under `apply --strict` a pass that changed nothing or missed its target),
130 interrupted (Ctrl-C; a training run saves a checkpoint first).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from . import __version__, limits

log = logging.getLogger("surgery")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="timm model name, torchvision:NAME, or an artifact folder from --out")
    p.add_argument("--weights", help="weights to load: .safetensors or a state-dict .pth (a training checkpoint "
                                     "too); for torchvision: a weights name such as IMAGENET1K_V2")
    p.add_argument("--pretrained", action="store_true",
                   help="the library's pretrained weights by name (timm: resnet50.a1_in1k, hf-hub:org/name; "
                        "torchvision: DEFAULT), from its cache (HF_HOME, TORCH_HOME; offline: HF_HUB_OFFLINE=1)")
    p.add_argument("--num-classes", type=limits.num_classes_arg, help="classifier size (default: the model's)")
    p.add_argument("--input-size", nargs="+", metavar="SIZE",
                   help="input as H, HxW, CxHxW or C H W (default: the model's pretrained_cfg)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--max-memory", type=limits.memory_arg, metavar="SIZE",
                   help="refuse sizes whose memory estimate exceeds this, e.g. 8G, 512M (default: this machine's RAM)")


def _train_args(p: argparse.ArgumentParser, *, epochs: bool = True, default_epochs: int = 10) -> None:
    g = p.add_argument_group("training")
    if epochs:
        g.add_argument("--epochs", type=int, default=default_epochs)
    g.add_argument("-b", "--batch-size", type=int, default=64, help="global batch (split over torchrun processes)")
    g.add_argument("--optimizer", "--opt", choices=["sgd", "adamw"], default="sgd")
    g.add_argument("--lr", type=float, help="peak learning rate (default: 0.1 sgd, 1e-3 adamw; 0.001 finetune)")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--warmup-epochs", type=float)
    g.add_argument("--label-smoothing", type=float, default=0.1)
    g.add_argument("--distill-weight", type=float, default=0.5, help="share of the KL term with a teacher")
    g.add_argument("--distill-temperature", type=float, default=4.0)
    g.add_argument("--clip-grad", type=float, metavar="NORM",
                   help="clip the global gradient norm at NORM each step (bilinear networks fine-tune at 1)")
    g.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower)")
    g.add_argument("-j", "--workers", type=int, help="data loading processes (default: none for in-memory data, "
                                                     "up to 8 for image folders)")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when there is a GPU)")
    g.add_argument("--limit", type=int, help=argparse.SUPPRESS)  # first N images: quick runs and tests
    g.add_argument("--keep-checkpoints", action="store_true",
                   help="keep --out/checkpoint (optimizer state, for --resume) after the run finished")


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE",
                   help="options from a YAML or JSON file (epochs: 3, pass: [fuse], model: resnet50, ...); "
                        "flags on the command line override it")


RESCALE_EPOCHS = 3  # default --rescale-epochs


def _rescale_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("progressive resizing (kernel rescaling, pass `rescale`)")
    g.add_argument("--rescale", type=float, metavar="FACTOR",
                   help="train the first --rescale-epochs epochs at FACTOR x resolution with rescaled kernels "
                        "(e.g. 0.5), then rescale the kernels back and finish at full size")
    g.add_argument("--rescale-epochs", type=int, metavar="N", help="epochs at low resolution (default: 3)")
    g.add_argument("--rescale-optimizer", choices=["reset", "carry"],
                   help="at the switch, start the optimizer fresh (default) or carry its state over")


def _schedule(args: argparse.Namespace):
    from .errors import SurgeryError

    if args.rescale is None:
        if args.rescale_epochs is not None or args.rescale_optimizer is not None:
            raise SurgeryError("--rescale-epochs and --rescale-optimizer need --rescale FACTOR, e.g. 0.5")
        return None
    from .schedule import ProgressiveResize

    epochs = RESCALE_EPOCHS if args.rescale_epochs is None else args.rescale_epochs
    return ProgressiveResize(factor=args.rescale, switch_epoch=epochs,
                             reset_optimizer=args.rescale_optimizer != "carry")


def _train_config(args: argparse.Namespace, *, finetune: bool = False):
    from .tasks import FINETUNE_LR
    from .train import TrainConfig, seed_everything

    seed_everything(args.seed)  # `finetune` builds its model after this: a random init is seeded too

    epochs = getattr(args, "epochs", None) or getattr(args, "finetune_epochs", 0)
    warmup = args.warmup_epochs if args.warmup_epochs is not None else (0.0 if finetune else 1.0)
    lr = args.lr if args.lr is not None else (FINETUNE_LR if finetune else None)
    return TrainConfig(epochs=epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                       workers=args.workers, device=args.device,
                       optimizer=args.optimizer, lr=lr, weight_decay=args.weight_decay, warmup_epochs=warmup,
                       label_smoothing=args.label_smoothing, distill_weight=args.distill_weight,
                       distill_temperature=args.distill_temperature, clip_grad=args.clip_grad, seed=args.seed,
                       compile=args.compile,
                       deterministic=args.deterministic, progress=not args.quiet)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="surgery",
        description="Rewrite PyTorch vision models as torch.fx graphs: passes, reports, ONNX.",
    )
    parser.add_argument("--version", action="version", version=f"surgery {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("apply", help="run passes on a model, report, and save an artifact",
                       description="Trace MODEL, run each --pass in order, print a before/after report.")
    _model_args(p)
    p.add_argument("--pass", dest="passes", action="append", metavar="SPEC",
                   help="NAME or NAME:key=value,key=value (repeatable; `surgery passes` lists them)")
    p.add_argument("--out", help="artifact folder: recipe.json, model.safetensors, report.json")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx and check it against onnxruntime")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--no-latency", action="store_true", help="do not measure latency at all (faster)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when a pass changed nothing or missed its target (the report is still written)")
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="fine-tune the rewritten model for N epochs on --data, distilling from the original")
    p.add_argument("--data", help="digits or an ImageFolder path: data for --finetune-epochs, and calibration "
                   "images for passes that use them (prune: importance=taylor; recover=on)")
    _train_args(p, epochs=False)
    _config_arg(p)

    p = sub.add_parser("train", help="train a model on a data set (a baseline to operate on)")
    _model_args(p)
    p.add_argument("--data", default="digits", help="digits (built in) or an ImageFolder path")
    p.add_argument("--out", help="artifact folder (checkpoints each epoch, history.json)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN",
                   help="continue the interrupted run in --out (or in RUN)")
    p.add_argument("--resume-anyway", action="store_true",
                   help="--resume even though training options (e.g. --epochs, --lr) differ from the checkpoint's")
    _train_args(p)
    _rescale_args(p)
    _config_arg(p)

    p = sub.add_parser("finetune", help="fine-tune an artifact (after surgery), optionally distilling")
    _model_args(p)
    p.add_argument("--data", default="digits", help="digits (built in) or an ImageFolder path")
    p.add_argument("--teacher", help="model or artifact to distill from (e.g. the model before surgery)")
    p.add_argument("--out", required=True, help="folder for the fine-tuned artifact")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN",
                   help="continue the interrupted run in --out (or in RUN)")
    p.add_argument("--resume-anyway", action="store_true",
                   help="--resume even though training options (e.g. --epochs, --lr) differ from the checkpoint's")
    _train_args(p, default_epochs=3)
    _rescale_args(p)
    _config_arg(p)

    p = sub.add_parser("evaluate", help="top-1 / top-5 / loss on the val split")
    _model_args(p)
    p.add_argument("--data", default="digits", help="digits (built in) or an ImageFolder path")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--limit", type=int, help=argparse.SUPPRESS)

    p = sub.add_parser("entropy", help="dataset entropy (EBCLE): mean per-image pixel entropy")
    p.add_argument("data", help="digits (built in) or an ImageFolder path")
    p.add_argument("--bits", action="store_true", help="base 2 instead of nats")
    p.add_argument("--plot", help="write a PNG histogram of the per-image values here")
    p.add_argument("--force", action="store_true", help="replace an existing --plot file")
    p.add_argument("--json", action="store_true", help="print as JSON")

    p = sub.add_parser("passes", help="list the passes with their options")
    p.add_argument("--json", action="store_true", help="print as JSON")

    p = sub.add_parser("inspect", help="graph summary: nodes, module types, params and FLOPs per stage")
    _model_args(p)

    p = sub.add_parser("verify", help="check an artifact: recipe schema and plans, checksums, weight shapes",
                       description="Validate an --out folder without running it: recipe.json against its schema, "
                                   "every pass plan, the sha256 of model.safetensors (and model.onnx), and the "
                                   "weights' shapes and dtypes against the rebuilt architecture.")
    p.add_argument("artifact", help="an artifact folder written by --out")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("export", help="export a model or artifact to ONNX and check it")
    _model_args(p)
    p.add_argument("--out", required=True, help="path of the .onnx file to write")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--rtol", type=float, default=1e-4, help="parity: relative tolerance (of max |torch output|)")
    p.add_argument("--atol", type=float, default=0.0, help="parity: absolute tolerance, added to the relative one")
    p.add_argument("--batch", type=int, action="append", metavar="N",
                   help="batch size checked for parity (repeat; default 1 and 4)")

    p = sub.add_parser("predict", help="top-k classes of images with an exported ONNX file (onnxruntime only)",
                       description="Classify images with MODEL.onnx, prepared as its metadata says "
                                   "(written by `apply --onnx` and `export`); torch is not imported.")
    p.add_argument("onnx", metavar="MODEL.onnx")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("-k", "--top-k", type=int, default=5, help="classes shown per image")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    return parser


def _load(args: argparse.Namespace):
    from .models import load_model

    return load_model(args.model, weights=args.weights, num_classes=args.num_classes,
                      input_size=args.input_size, pretrained=args.pretrained)


def _inputs(args: argparse.Namespace) -> list[str]:
    """Paths a run reads, which its --out must never replace: the source artifact, weights, data."""
    paths = [getattr(args, name, None) for name in ("model", "weights", "data", "teacher")]
    return [p for p in paths if p and p != "digits" and Path(p).exists()]


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text)


def cmd_apply(args: argparse.Namespace) -> int:
    from .artifact import check_out_dir
    from .errors import SurgeryError
    from .pipeline import apply, resolve_passes
    from .report import effect_line, format_table

    resolve_passes(args.passes)  # bad specs fail before anything slow
    if args.onnx and not args.out:
        raise SurgeryError("--onnx writes model.onnx into the artifact: add --out DIR")
    if args.finetune_epochs and not args.data:
        raise SurgeryError("--finetune-epochs needs --data (digits or an ImageFolder path)")
    if args.out:
        check_out_dir(args.out, args.force, protect=_inputs(args))
    t0 = time.perf_counter()
    log.info("loading %s", args.model)
    loaded = _load(args)
    log.info("tracing and running %s", " -> ".join(args.passes))
    result = apply(loaded, args.passes, measure=True, latency=not args.no_latency, data=args.data)
    if args.data:
        from .models import LoadedModel
        from .tasks import compare_accuracy

        log.info("evaluating the original and the rewritten model on %s", args.data)
        original = LoadedModel(result.original, loaded.input_size, loaded.source, loaded.passes)
        result.report["accuracy"] = compare_accuracy({"original": original, "rewritten": result.as_loaded()},
                                                     args.data, limit=args.limit)
    if args.finetune_epochs:
        from .tasks import evaluate_model, finetune

        log.info("fine-tuning for %d epoch(s) on %s, distilling from the original", args.finetune_epochs, args.data)
        tuned = finetune(result.as_loaded(), args.data, _train_config(args, finetune=True), teacher=result.original,
                         limit=args.limit)
        accuracy = result.report["accuracy"]
        accuracy["finetuned"] = evaluate_model(result.as_loaded(), args.data, limit=args.limit)
        # before: the rewritten model as apply left it, on the same val split as after
        result.report["finetune"] = {"before": accuracy["rewritten"], "after": accuracy["finetuned"],
                                     "history": tuned.history, "seconds": tuned.seconds}
    if args.out:
        log.info("saving to %s%s", args.out, " (with ONNX export and parity check)" if args.onnx else "")
        result.save(args.out, onnx=args.onnx, force=args.force)
    log.info("done in %.1fs", time.perf_counter() - t0)
    text = format_table(result.report)
    if args.out:
        text += f"\nsaved: {args.out}/ (recipe.json, model.safetensors, report.json, report.png"
        text += ", model.onnx)" if args.onnx else ")"
    _emit(args, result.report, text)
    if args.strict:
        failed = [f"{r['pass']}: {effect_line(r['effect'])}" for r in result.report["passes"]
                  if "effect" in r and (not r["effect"]["changed"] or not r["effect"].get("target", {}).get("met", 1))]
        if failed:
            print("strict: " + "; ".join(failed), file=sys.stderr)
            return 1
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    from .passes import describe

    info = describe()
    lines = []
    for p in info:
        lines.append(f"{p['name']}: {p['doc']}")
        for o in p["options"]:
            lines.append(f"    {o['name']} ({o['type']}, default {o['default']!r})  {o['doc']}")
    lines.append("\nuse: surgery apply MODEL --pass NAME:key=value,key=value")
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print("\n".join(lines))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .graph import trace
    from .pipeline import example_batch
    from .report import count_params, flops_by_child

    loaded = _load(args)
    example = example_batch(loaded.input_size, batch=1)
    gm = trace(loaded.model, example)
    ops = Counter(n.op for n in gm.graph.nodes)
    types = Counter(type(m).__name__ for _, m in gm.named_modules() if not list(m.children()))
    flops = flops_by_child(loaded.model, example)
    stages = [{"name": name, "type": type(child).__name__, "params": count_params(child),
               "flops": flops.get(name, 0)} for name, child in loaded.model.named_children()]
    data = {
        "model": loaded.name, "input_size": list(loaded.input_size),
        "nodes": len(gm.graph.nodes), "ops": dict(ops), "module_types": dict(types.most_common()),
        "params": count_params(loaded.model), "flops": sum(s["flops"] for s in stages),
        "stages": stages, "leaf_fallbacks": gm.meta["surgery"].leaf_fallbacks,
    }
    lines = [f"{data['model']}  input {'x'.join(map(str, loaded.input_size))}  "
             f"{data['nodes']} graph nodes ({', '.join(f'{k} {v}' for k, v in ops.items())})",
             f"params {data['params']:,}  FLOPs {data['flops']:,}", "",
             f"{'stage':<20}  {'type':<20} {'params':>12} {'FLOPs':>14}"]
    for s in stages:
        lines.append(f"{s['name']:<20}  {s['type']:<20} {s['params']:>12,} {s['flops']:>14,}")
    lines += ["", "modules: " + ", ".join(f"{k} x{v}" for k, v in types.most_common())]
    if data["leaf_fallbacks"]:
        lines.append("untraceable submodules kept as leaves: " + ", ".join(data["leaf_fallbacks"]))
    _emit(args, data, "\n".join(lines))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .errors import SurgeryError
    from .export import export_verified, onnx_metadata
    from .graph import trace
    from .pipeline import example_batch
    from .safeio import check_file_target

    out = check_file_target(args.out, force=args.force, what="--out")
    loaded = _load(args)
    model = loaded.model
    if not hasattr(model, "graph"):
        model = trace(model, example_batch(loaded.input_size))
    log.info("exporting %s to %s", loaded.name, out)
    recipe = None
    if Path(args.model).is_dir():
        from .artifact import read_recipe

        recipe = read_recipe(args.model)
    if args.opset is not None and not 7 <= args.opset <= 30:
        raise SurgeryError(f"--opset {args.opset} is out of range; give an ONNX opset such as 17 or 18")
    if args.rtol < 0 or args.atol < 0 or any(b < 1 for b in args.batch or []):
        raise SurgeryError("--rtol and --atol must be >= 0 and each --batch >= 1")
    result = export_verified(model, out, loaded.input_size, opset=args.opset, rtol=args.rtol, atol=args.atol,
                             batch_sizes=tuple(args.batch or (1, 4)),
                             metadata=onnx_metadata(loaded.input_size, loaded.io, recipe))
    par, lat = result["parity"], result["latency_ms"]
    text = (f"wrote {out} ({result['bytes'] / 1e6:.1f} MB, {result['exporter']} exporter)\n"
            f"parity: " + ", ".join(f"batch {b}: max|diff| {d:.2e}" for b, d in par["max_abs_diff"].items())
            + f"\nlatency b=1: torch {lat['torch']:.2f} ms, onnxruntime {lat['onnxruntime']:.2f} ms")
    _emit(args, result, text)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import format_predictions, predict

    if args.top_k < 1:
        from .errors import SurgeryError

        raise SurgeryError("--top-k must be at least 1")
    results = predict(args.onnx, args.images, top_k=args.top_k)
    _emit(args, results, format_predictions(results))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .artifact import verify_artifact

    info = verify_artifact(args.artifact)
    onnx = {None: ", model.onnx present but not in the recipe (unchecked)"}.get(
        info.get("onnx_sha256", ""), ", model.onnx sha256 ok" if info.get("onnx_sha256") else "")
    text = (f"ok: {args.artifact}: {info['source']} + {' -> '.join(info['passes']) or 'no passes'}, input "
            f"{'x'.join(map(str, info['input_size']))}; recipe schema and plans ok, model.safetensors sha256 ok, "
            f"{info['tensors']} tensors ({info['params']:,} params) match the architecture{onnx}")
    _emit(args, info, text)
    return 0


def _print_metrics(args: argparse.Namespace, data: dict, title: str) -> None:
    m = data["metrics"] if "metrics" in data else data
    text = f"{title}: val top-1 {m['val_top1']:.4f}  top-5 {m['val_top5']:.4f}  loss {m['val_loss']:.4f}"
    if "history" in data and any("phase" in h for h in data["history"]):
        from .schedule import phase_summary

        text += "".join(f"\n  {name} phase at {p['image_size']}x{p['image_size']}: {p['epochs']} epoch(s), "
                        f"{p['images_per_s']:.0f} images/s" for name, p in phase_summary(data["history"]).items())
    _emit(args, data, text)


def cmd_train(args: argparse.Namespace) -> int:
    from .tasks import train

    result = train(args.model, args.data, _train_config(args), out=args.out, num_classes=args.num_classes,
                   input_size=args.input_size, weights=args.weights, pretrained=args.pretrained,
                   resume=args.resume, force=args.force,
                   resume_anyway=args.resume_anyway, keep_checkpoints=args.keep_checkpoints,
                   limit=args.limit, schedule=_schedule(args), protect=_inputs(args))
    _print_metrics(args, {"metrics": result.metrics, "seconds": result.seconds, "history": result.history},
                   f"trained in {result.seconds:.0f}s" + (f", saved {result.out}" if result.out else ""))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from .tasks import finetune

    cfg = _train_config(args, finetune=True)
    result = finetune(_load(args), args.data, cfg, teacher=args.teacher, out=args.out, resume=args.resume,
                      resume_anyway=args.resume_anyway, keep_checkpoints=args.keep_checkpoints,
                      force=args.force, limit=args.limit, schedule=_schedule(args), protect=_inputs(args))
    _print_metrics(args, {"metrics": result.metrics, "seconds": result.seconds, "history": result.history},
                   f"fine-tuned in {result.seconds:.0f}s, saved {result.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .tasks import evaluate_model

    metrics = evaluate_model(_load(args), args.data, batch_size=args.batch_size, limit=args.limit)
    _print_metrics(args, metrics, f"{args.model} on {args.data}")
    return 0


def cmd_entropy(args: argparse.Namespace) -> int:
    from .entropy import dataset_entropy, plot_histogram

    if args.plot:
        from .safeio import check_file_target

        check_file_target(args.plot, force=args.force, what="--plot")
    stats = dataset_entropy(args.data, bits=args.bits, progress=not args.quiet)
    text = (f"{args.data}: entropy {stats.mean:.4f} {stats.unit} (std {stats.std:.4f}, "
            f"min {stats.min:.4f}, max {stats.max:.4f}) over {stats.images} images")
    if args.plot:
        plot_histogram(stats, args.plot)
        text += f"\nhistogram: {args.plot}"
    _emit(args, stats.to_dict(), text)
    return 0


COMMANDS = {
    "apply": cmd_apply, "passes": cmd_passes, "inspect": cmd_inspect, "export": cmd_export, "verify": cmd_verify,
    "predict": cmd_predict,
    "train": cmd_train, "finetune": cmd_finetune, "evaluate": cmd_evaluate, "entropy": cmd_entropy,
}


def _with_config(parser: argparse.ArgumentParser, argv: list[str], args: argparse.Namespace) -> list[str]:
    """``argv`` with the options of ``--config`` added (the command line's own win)."""
    from .cliconfig import config_tokens, read_config

    sub = parser._subparsers._group_actions[0].choices[args.verb]  # type: ignore[union-attr]
    i = argv.index(args.verb)
    tokens = config_tokens(sub, read_config(args.config), argv[i + 1:], args.config,
                           model_given=getattr(args, "model", None) is not None)
    model = [tokens.pop(0)] if tokens and not tokens[0].startswith("-") else []
    return argv[:i + 1] + model + argv[i + 1:] + tokens


def _normalize(args: argparse.Namespace) -> None:
    """What the parser cannot check alone: a model given, sizes as one string, --resume RUN."""
    from .errors import SurgeryError

    if hasattr(args, "model") and args.model is None:
        raise SurgeryError(f"give a MODEL: surgery {args.verb} MODEL ... (or model: in --config)")
    if getattr(args, "input_size", None) is not None:
        args.input_size = args.input_size[0] if len(args.input_size) == 1 else "x".join(args.input_size)
    if args.verb == "apply" and not args.passes:
        raise SurgeryError("give at least one --pass NAME[:key=value,...] (or pass: in --config)")
    if isinstance(getattr(args, "resume", None), str):
        if args.out and Path(args.out).absolute() != Path(args.resume).absolute():
            raise SurgeryError(f"--resume {args.resume} and --out {args.out} name different runs; give one")
        args.out, args.resume = args.resume, True


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    # Our own steps at INFO; other libraries' loggers only from WARNING, under their names.
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)
    for handler in [h for h in log.handlers if getattr(h, "surgery_cli", False)]:
        log.removeHandler(handler)  # main() called again in one process: one handler, on today's stderr
    ours = logging.StreamHandler(sys.stderr)
    ours.setFormatter(logging.Formatter("[surgery] %(message)s"))
    ours.surgery_cli = True  # type: ignore[attr-defined]
    log.addHandler(ours)
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    log.propagate = False
    from . import progress

    progress.set_enabled(False if args.quiet else None)  # None: on at a terminal or SURGERY_PROGRESS=1
    from .errors import Interrupted, ParityError, SurgeryError  # no torch: `predict` runs without it

    try:
        if getattr(args, "config", None):
            args = parser.parse_args(_with_config(parser, argv, args))
        _normalize(args)
        limits.set_max_memory(getattr(args, "max_memory", None))  # None: the machine's RAM
        return COMMANDS[args.verb](args)
    except Interrupted as exc:  # Ctrl-C during training: the message says what was saved
        print(exc, file=sys.stderr)
        return 130
    except SurgeryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ParityError as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
