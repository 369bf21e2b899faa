"""finetune_core: the fine-tuning engine behind the dashboard. Never imports streamlit."""

import os

# Training shares the CPU with the dashboard's server, other runs and the data pipeline.
# OpenMP's default busy-waiting collapses when threads outnumber free cores (measured on
# 2 cores with other work running: ResNet-18 training fell from ~70 to ~6 images/s);
# passive waiting keeps it at ~70. It must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
