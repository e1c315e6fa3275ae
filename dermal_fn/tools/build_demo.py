"""Rebuild the committed demo bundle: train the synthetic-data CNN (seeded), export, verify, calibrate.

    python -m dermal_fn.tools.build_demo [--out dermal_fn/models/synthetic_demo.dermal] [--seed 0]
    python -m dermal_fn.tools.build_demo --calibrate-only   # re-fit the committed bundle's calibration (seconds)

(``make demo-model``). The bundle's name says it is a synthetic demo, not a diagnostic model. It is
calibrated on generated images (CALIBRATION_IMAGES, seeded), so a real photo of skin, or anything
else, is told apart as ``distribution: out``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from dermal_fn.models import DEMO_BUNDLE

DEMO_NAME = "synthetic-demo (not for diagnosis)"
CALIBRATION_IMAGES = 800
CALIBRATION_SEED = 2024

logger = logging.getLogger(__name__)


def build(out: Path, *, seed: int = 0) -> Path:
    """Train the demo model in a temporary folder, export it, and write it calibrated to ``out``."""
    from dermal_fn.demo import train
    from dermal_fn.keras.export import export_keras

    with tempfile.TemporaryDirectory(prefix="dermal-demo-") as tmp:
        keras_path = train.train(tmp, seed=seed)
        exported = Path(tmp) / "exported.dermal"
        export_keras(
            keras_path,
            exported,
            labels=Path(tmp) / train.LABELS_FILENAME,
            layer=train.GRADCAM_LAYER,
            input_scale="raw",
            name=DEMO_NAME,
        )
        calibrate_demo(exported, out)
    return out


def calibrate_demo(bundle: Path, out: Path) -> dict[str, object]:
    """Calibrate ``bundle`` on CALIBRATION_IMAGES generated images (seeded) into ``out``; the section."""
    from dermal_fn.demo import synth
    from dermal_fn.tools.trust import calibrate, calibration_table

    with tempfile.TemporaryDirectory(prefix="dermal-demo-calibration-") as tmp:
        synth.save_labelled(Path(tmp), CALIBRATION_IMAGES, seed=CALIBRATION_SEED)
        section = calibrate(bundle, tmp, out, progress=None)
    logger.info("calibrated on %d generated images:\n%s", CALIBRATION_IMAGES, calibration_table(section))
    return section


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEMO_BUNDLE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--calibrate-only", action="store_true", help="re-fit the calibration of --out in place"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.calibrate_only:
        calibrate_demo(args.out, args.out)
        path = args.out
    else:
        path = build(args.out, seed=args.seed)
    logger.info("demo bundle: %s (%.0f KB)", path, path.stat().st_size / 1024)
    return 0


if __name__ == "__main__":
    sys.exit(main())
