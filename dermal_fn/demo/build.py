"""Rebuild the committed demo bundle: train the synthetic-data CNN (seeded), export, verify.

    python -m dermal_fn.demo.build [--out dermal_fn/models/synthetic_demo.dermal] [--seed 0]

(``make demo-model``). The bundle's name says it is a synthetic demo, not a diagnostic model.
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

logger = logging.getLogger(__name__)


def build(out: Path, *, seed: int = 0) -> Path:
    """Train the demo model in a temporary folder and export it to ``out``."""
    from dermal_fn.demo import train
    from dermal_fn.keras.export import export_keras

    with tempfile.TemporaryDirectory(prefix="dermal-demo-") as tmp:
        keras_path = train.train(tmp, seed=seed)
        export_keras(
            keras_path,
            out,
            labels=Path(tmp) / train.LABELS_FILENAME,
            layer=train.GRADCAM_LAYER,
            input_scale="raw",
            name=DEMO_NAME,
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEMO_BUNDLE)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    path = build(args.out, seed=args.seed)
    logger.info("demo bundle: %s (%.0f KB)", path, path.stat().st_size / 1024)
    return 0


if __name__ == "__main__":
    sys.exit(main())
