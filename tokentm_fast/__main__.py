"""``python -m tokentm_fast`` = the ``tokentm-fast`` command line."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
