"""Comparison report over a Hydra multirun (`make sweep`, or `train.py -m model=a,b seed=1,2,3`: the seeds of a
variant become one row, mean ± sd); the report itself is `captioner.report`.

usage: python experiments/compare.py SWEEP_DIR [--out DIR] [--bootstrap 1000] [--seed 0] [--html-images 12]

Writes report.md, report.html (self-contained), report.json, loss_curves.png and bleu_curves.png into
SWEEP_DIR/report/ (or --out).
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python experiments/compare.py` puts experiments/, not the repo root, on the path
    sys.path.insert(0, str(REPO))

from captioner.report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
