"""Command line: ``python -m dermal_fn export|predict|compare ...``."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dermal_fn import __version__
from dermal_fn.errors import DermalError
from dermal_fn.serving.logs import close_quietly_at_exit


def _export(args: argparse.Namespace) -> int:
    from dermal_fn.keras.export import export_keras, input_spec
    from dermal_fn.tools.folders import calibration_images

    spec = input_spec(args.input_scale, mean=args.mean, std=args.std, resize=args.resize)
    read: dict[tuple[str | None, tuple[int, int]], list[np.ndarray]] = {}

    def photos(folder: str | None, size: tuple[int, int], limit: int) -> list[np.ndarray]:
        if (folder, size) not in read:
            read[folder, size] = calibration_images(
                folder, size, spec.scale, limit=limit, resize=spec.resize, normalization=spec.normalization
            )
        return read[folder, size]

    # int8 calibrates on four fifths of --calibration and is checked on the fifth it never saw,
    # unless --verify names photos of their own; other modes are checked on either folder
    hold_out = args.quantize == "int8" and args.verify is None and args.calibration is not None

    def calibration(size: tuple[int, int]) -> list[np.ndarray]:
        images = photos(args.calibration, size, 125 if hold_out else 100)
        return [x for i, x in enumerate(images) if i % 5 != 4] if hold_out else images

    def held_out(size: tuple[int, int]) -> list[np.ndarray]:
        if args.verify is not None:
            return photos(args.verify, size, 100)
        if args.calibration is None:
            return []  # the exporter checks on generated images, and says so
        images = photos(args.calibration, size, 125 if hold_out else 100)
        return [x for i, x in enumerate(images) if i % 5 == 4] if hold_out else images

    source = (
        "photos of the --verify folder"
        if args.verify is not None
        else "held-out photos of the --calibration folder (every fifth, not calibrated on)"
        if hold_out
        else "photos of the --calibration folder"
    )

    export_keras(
        args.model,
        args.out,
        labels=args.labels,
        layer=args.layer,
        quantize=args.quantize,
        calibration=calibration,
        input_scale=args.input_scale,
        mean=args.mean,
        std=args.std,
        resize=args.resize,
        name=args.name,
        custom_objects=args.custom_objects,
        held_out=held_out if args.quantize != "none" else None,
        held_out_source=source,
        min_agreement=args.min_agreement,
        min_heatmap_r=args.min_heatmap_r,
        mixed=args.mixed_precision,
        max_float_layers=args.max_float_layers,
    )
    return 0


def _predict(args: argparse.Namespace) -> int:
    from dermal_fn.serving.config import Settings
    from dermal_fn.serving.options import PredictOptions
    from dermal_fn.serving.service import Service

    settings = dataclasses.replace(Settings.from_env(), model_uri=args.model)
    options = PredictOptions.parse(
        {
            "top_k": args.top_k,
            "class": args.class_,
            "score": args.score,
            "gradcam": False if args.no_gradcam else None,
        }
    )
    image = Path(args.image).read_bytes()
    body = Service(settings).predict(image, options).body
    if args.overlay and body["gradcam"].get("status") == "ok":
        Path(args.overlay).write_bytes(base64.b64decode(body["gradcam"]["overlay_png"]))
    json.dump(body, sys.stdout)
    sys.stdout.write("\n")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from dermal_fn.tools.trust import calibrate, calibration_table

    section = calibrate(args.bundle, args.data, args.out, target_accuracy=args.target_accuracy)
    sys.stdout.write(calibration_table(section) + "\n")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from dermal_fn.tools.evaluate import evaluate, evaluate_rows, evaluation_table

    if args.rows is not None:
        report = evaluate_rows(args.bundle, args.rows)
    elif args.data is None:
        raise DermalError(
            "expected --data DIR (one sub-folder per label) or --rows 'PREFIX-*.jsonl', found neither"
        )
    else:
        report = evaluate(
            args.bundle, args.data, ood=args.ood, audit_images=args.audit_images, html=args.html
        )
    if args.write:
        from dermal_fn.tools.evaluate import write_audit

        write_audit(args.bundle, args.write, report)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1) + "\n")
    sys.stdout.write(evaluation_table(report) + "\n")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from dermal_fn.tools.compare import main as compare_main

    return compare_main(args)


def _triple(text: str) -> tuple[float, float, float]:
    """``R,G,B`` as three numbers (argparse type)."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers R,G,B, found {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers R,G,B, found {len(values)} in {text!r}")
    return values[0], values[1], values[2]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every command."""
    parser = argparse.ArgumentParser(prog="dermal-fn", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dermal-fn {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser("export", help="turn a Keras classifier into a serving bundle")
    export.add_argument(
        "model",
        help="a .keras or .h5 file (Keras 3 or 2) or a Keras 2 SavedModel folder; Teachable Machine's keras_model.h5",
    )
    export.add_argument("--out", required=True, help="the bundle file to write")
    export.add_argument(
        "--labels",
        help="labels file: one per line, or '<index> <name>' lines (default class_0, class_1, ...)",
    )
    export.add_argument("--layer", help="Grad-CAM layer (default: the last layer with a 4-D output)")
    export.add_argument("--quantize", default="none", choices=["none", "fp16", "int8-dynamic", "int8"])
    export.add_argument(
        "--calibration",
        help="folder of your own photos: int8 calibrates on four fifths and is checked on the rest;"
        " other modes are checked on it",
    )
    export.add_argument("--verify", help="folder of photos a quantized bundle is checked on against fp32")
    export.add_argument(
        "--min-agreement",
        type=float,
        default=0.98,
        help="a quantized bundle below this top-1 agreement with fp32 is not written (0.98)",
    )
    export.add_argument(
        "--min-heatmap-r",
        type=float,
        default=0.95,
        help="a quantized bundle below this mean heatmap Pearson r with fp32 is not written (0.95)",
    )
    export.add_argument(
        "--mixed-precision",
        action="store_true",
        help="when full int8 misses the gate, keep the layers int8 hurts most in float until it holds"
        " (the manifest says which, and the speed cost)",
    )
    export.add_argument(
        "--max-float-layers",
        type=int,
        default=32,
        help="with --mixed-precision, the most layers kept in float before giving up (32)",
    )
    export.add_argument(
        "--input-scale",
        default="raw",
        choices=["raw", "unit", "symmetric", "caffe", "torch"],
        help="what the model expects: raw 0-255 (default), unit 0-1, symmetric -1..1 (Teachable Machine), "
        "caffe (BGR minus the ImageNet mean: ResNet/VGG preprocess_input), torch (0-1, ImageNet mean/std)",
    )
    export.add_argument("--mean", type=_triple, help="R,G,B subtracted after the scale (e.g. 0.5,0.5,0.5)")
    export.add_argument("--std", type=_triple, help="R,G,B divided by after the mean")
    export.add_argument(
        "--custom-objects", help="a Python file imported first: its register_keras_serializable classes"
    )
    export.add_argument("--resize", default="bilinear", choices=["bilinear", "nearest", "bicubic", "area"])
    export.add_argument("--name", help="model name in the bundle (default: the file's stem)")
    export.set_defaults(run=_export)

    predict = commands.add_parser("predict", help="print the JSON that POST /predict returns")
    predict.add_argument("model", help="a bundle, a .keras file or a gs:// URI")
    predict.add_argument("image")
    predict.add_argument("--top-k", type=int, default=3)
    predict.add_argument("--class", dest="class_", help="class index or label for Grad-CAM")
    predict.add_argument("--score", default="logit", choices=["logit", "probability"])
    predict.add_argument("--no-gradcam", action="store_true")
    predict.add_argument("--overlay", help="also write the overlay PNG here")
    predict.set_defaults(run=_predict)

    calibrate = commands.add_parser(
        "calibrate", help="fit temperature, distribution and abstention thresholds on a labelled folder"
    )
    calibrate.add_argument("bundle")
    calibrate.add_argument("--data", required=True, help="one sub-folder per label, named as the labels")
    calibrate.add_argument("--out", required=True, help="the calibrated bundle to write")
    calibrate.add_argument(
        "--target-accuracy", type=float, default=0.9, help="accuracy the confident answers must reach (0.9)"
    )
    calibrate.set_defaults(run=_calibrate)

    evaluate = commands.add_parser(
        "evaluate", help="balanced accuracy, ECE, NLL, AUROC, coverage on a folder"
    )
    evaluate.add_argument("bundle")
    evaluate.add_argument("--data", help="one sub-folder per label, named as the labels")
    evaluate.add_argument(
        "--rows", help="instead of --data: dermal-fn batch rows with labels ('PREFIX-*.jsonl')"
    )
    evaluate.add_argument("--ood", help="a folder of images unlike the data: the distribution score's AUROC")
    evaluate.add_argument("--json", dest="json_out", help="also write the figures as JSON here")
    evaluate.add_argument("--html", help="also write the audit as one self-contained HTML page here")
    evaluate.add_argument(
        "--write", help="also write a copy of the bundle that carries the audit (GET /model shows it)"
    )
    evaluate.add_argument(
        "--audit-images", type=int, default=50, help="photos that get the faithfulness curves (50; 0 skips)"
    )
    evaluate.set_defaults(run=_evaluate)

    compare = commands.add_parser("compare", help="quantization report: BASE vs OTHER on a folder of images")
    compare.add_argument("base")
    compare.add_argument("other")
    compare.add_argument("--images", required=True, help="folder of images")
    compare.add_argument("--min-agreement", type=float, help="fail (exit 1) below this top-1 agreement")
    compare.add_argument(
        "--min-heatmap-r", type=float, help="fail (exit 1) below this mean heatmap Pearson r"
    )
    compare.add_argument("--json", dest="json_out", help="also write the report as JSON here")
    compare.add_argument("--limit", type=int, default=200, help="at most this many images")
    compare.add_argument(
        "--threads", type=int, default=1, help="LiteRT threads for both models (default 1, as on 0.5 CPU)"
    )
    compare.set_defaults(run=_compare)

    batch = commands.add_parser(
        "batch",
        help="score a folder, glob, gs:// prefix or CSV of paths on Apache Beam (needs dermal-fn[batch])",
    )
    batch.add_argument("--model", required=True, help="a bundle, gs:// or https:// URI")
    batch.add_argument(
        "--input", required=True, help="a folder, a glob, a gs:// prefix or glob, or a CSV of paths"
    )
    batch.add_argument("--output", required=True, help="the output prefix: PREFIX-00000-of-0000N.jsonl")
    batch.add_argument("--heatmaps", help="also write each photo's overlay PNG into this folder")
    batch.add_argument("--top-k", type=int, help="classes per row (default: all of them)")
    batch.add_argument("--no-gradcam", action="store_true")
    batch.add_argument("--threads", type=int, default=1, help="LiteRT threads per worker (1)")
    batch.set_defaults(run=_batch)

    serve = commands.add_parser(
        "serve", help="serve the HTTP API with functions-framework (MODEL_URI, or the synthetic demo)"
    )
    serve.add_argument("--port", type=int, default=int(os.environ.get("PORT") or 8080))
    serve.add_argument("--host", default="0.0.0.0")
    serve.set_defaults(run=_serve)
    return parser


def _batch(args: argparse.Namespace) -> int:
    try:
        from dermal_fn.batch.pipeline import run
    except ImportError as exc:
        raise DermalError(
            f"expected Apache Beam for batch scoring, found it not installed ({exc.name}): pip install 'dermal-fn[batch]'"
        ) from None
    summary = run(
        args.model,
        args.input,
        args.output,
        heatmaps=args.heatmaps,
        top_k=args.top_k,
        gradcam=not args.no_gradcam,
        beam_args=args.beam_args,
        threads=args.threads,
    )
    sys.stdout.write(json.dumps(summary.as_json()) + "\n")
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Replace this process with functions-framework serving :mod:`dermal_fn.serving.function`."""
    from dermal_fn.serving import function

    argv = [
        sys.executable,
        "-m",
        "functions_framework",
        "--target=dermal",
        f"--source={function.__file__}",
        f"--host={args.host}",
        f"--port={args.port}",
    ]
    shown = "localhost" if args.host in ("0.0.0.0", "::") else args.host
    logging.getLogger("dermal_fn").info("serving on http://%s:%d/ (the upload page)", shown, args.port)
    os.execv(sys.executable, argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; errors are one clear line on stderr and exit status 2."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "batch":  # only batch passes options on (to Beam)
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.beam_args = extra
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    # what LiteRT's process-wide environments print as C++ destroys them after Python: not on the console
    close_quietly_at_exit(logging.getLogger("dermal_fn.litert"))
    try:
        return int(args.run(args))
    except (DermalError, OSError) as exc:
        # one line (two with the cause) for people; the traceback with -v
        logging.getLogger("dermal_fn").error("error: %s", exc, exc_info=exc if args.verbose else None)
        return 2


if __name__ == "__main__":
    sys.exit(main())
