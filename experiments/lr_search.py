"""The learning-rate search's summary (`make search`); the summary itself is `captioner.report.lr_search`.

usage: python experiments/lr_search.py SWEEP_DIR [--out FILE.md]

Prints, and writes to SWEEP_DIR/lr_search.md and .json (or --out), each variant's best validation BLEU-4 at every
learning rate of the sweep and the one chosen.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python experiments/lr_search.py` puts experiments/, not the repo root, on the path
    sys.path.insert(0, str(REPO))

from captioner.report.lr_search import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
