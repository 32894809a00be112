"""`python -m luthier ...` is the `luthier` command (for environments without the script on PATH)."""

from .cli import main

raise SystemExit(main())
