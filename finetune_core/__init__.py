"""finetune_core: the fine-tuning engine behind the dashboard. Never imports streamlit."""

__version__ = "0.1.0"
