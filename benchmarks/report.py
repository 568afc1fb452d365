"""Gather benchmarks/results/*.json into benchmarks/results/REPORT.md with PNG plots (see llm2vec_fast.report)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from llm2vec_fast.report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
