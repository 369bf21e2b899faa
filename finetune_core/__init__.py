"""finetune_core: the fine-tuning engine behind the dashboard. Never imports streamlit.

`finetune_core.load_model(RUN)` gives a finished run's model to use in code (see
finetune_core.predict); it is imported on first use, so that importing finetune_core
stays cheap for the pages and workers that never need it.
"""

__version__ = "0.1.0"

__all__ = ["load_model"]


def __getattr__(name: str):
    if name == "load_model":  # lazy: torch and the engine load only when it is used
        from finetune_core.predict import load_model

        return load_model
    raise AttributeError(f"module 'finetune_core' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "load_model"])
