"""`python -m finetune_core ...`: the command line, the queue's supervisor and its workers."""

import os

# A process setting, made here (where the process starts) and not on import: OpenMP waits
# passively instead of spinning, which keeps training fast when the cores are shared
# (see runner.child_env). It must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from finetune_core.cli import main  # noqa: E402

raise SystemExit(main())
