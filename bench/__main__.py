"""`python -m gptfast.bench` (or `python -m bench` from a source checkout): see cli.py."""
import sys

from .cli import main

sys.exit(main(sys.argv[1:]))
