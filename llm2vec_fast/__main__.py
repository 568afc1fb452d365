"""``python -m llm2vec_fast ...``: the ``llm2vec-fast`` command line."""
import sys

from .cli import main

sys.exit(main())
