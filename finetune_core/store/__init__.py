"""The run store: the run folder's contract and the one module that reads and writes it.

runs/<run_id>/ holds config.json, status.json, metrics.jsonl, summary.json, checkpoints/
and worker.log (see DESIGN.md). JSON files are replaced atomically; metrics.jsonl is only
appended to. schema.py is the contract (format version, states, keys), status.py the one
place states change, metrics.py the records, runs.py creating and reading a folder, and
table.py the one table of runs that Home, Compare and the CLI show.

Imports neither torch nor the engine, so that listing runs stays fast.
"""

from finetune_core.store.metrics import (
    MetricsWriter,
    clean_metric_records,
    read_metrics,
    signature,
)
from finetune_core.store.paths import (
    is_run_dir,
    new_group_id,
    new_run_id,
    resolve_run,
    resolve_run_id,
    run_dirs,
    runs_dir,
)
from finetune_core.store.runs import (
    create_run,
    delete_run,
    disk_bytes,
    read_config,
    read_log_tail,
    read_summary,
    rename_run,
    run_config,
    write_summary,
)
from finetune_core.store.schema import (
    CRASHED_MESSAGE,
    FINAL_STATES,
    LIVE_STATES,
    METRIC_COLUMNS,
    RESUMABLE_STATES,
    RUN_ID_RE,
    SCHEMA_VERSION,
    STATES,
    SUMMARY_KEYS,
    RunError,
)
from finetune_core.store.status import (
    any_queued,
    can_resume,
    is_orphaned,
    read_status,
    set_state,
    update_status,
    write_progress,
    write_status,
)
from finetune_core.store.table import (
    COMPARE_COLUMNS,
    LIST_COLUMNS,
    RunReading,
    compare_runs,
    list_runs,
    read_run,
    runs_table,
)

__all__ = [
    "COMPARE_COLUMNS",
    "CRASHED_MESSAGE",
    "FINAL_STATES",
    "LIST_COLUMNS",
    "LIVE_STATES",
    "METRIC_COLUMNS",
    "RESUMABLE_STATES",
    "RUN_ID_RE",
    "SCHEMA_VERSION",
    "STATES",
    "SUMMARY_KEYS",
    "any_queued",
    "can_resume",
    "MetricsWriter",
    "RunError",
    "RunReading",
    "clean_metric_records",
    "compare_runs",
    "create_run",
    "delete_run",
    "disk_bytes",
    "is_orphaned",
    "is_run_dir",
    "list_runs",
    "new_group_id",
    "new_run_id",
    "read_config",
    "read_log_tail",
    "read_metrics",
    "read_run",
    "read_status",
    "read_summary",
    "rename_run",
    "resolve_run",
    "resolve_run_id",
    "run_config",
    "run_dirs",
    "runs_dir",
    "runs_table",
    "set_state",
    "signature",
    "update_status",
    "write_progress",
    "write_status",
    "write_summary",
]
