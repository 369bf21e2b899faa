"""The run store: the run folder's contract and the one module that reads and writes it.

runs/<run_id>/ holds config.json, status.json, metrics.jsonl, summary.json, checkpoints/
and worker.log (see DESIGN.md). JSON files are replaced atomically; metrics.jsonl is only
appended to. schema.py is the contract (format version, states, keys), status.py the one
place states change, metrics.py the records, runs.py creating and reading a folder, and
table.py the one table of runs that Home, Compare and the CLI show. Reading never writes
(a crash is shown, derived, until the supervisor, stop or resume records it), so every
reader works on a full disk; one unreadable file makes its run read as "unknown", never
stops the others.

Who may act on a run on a shared server (owners, admins, the demo mode) is access.py;
each user's limits quota.py.

Imports neither torch nor the engine, so that listing runs stays fast.
"""

from finetune_core.store import access, quota
from finetune_core.store.metrics import (
    MetricsWriter,
    clean_metric_records,
    read_drift,
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
from finetune_core.store.predictions import (
    read_predictions,
    read_scored_images,
    scored_images,
)
from finetune_core.store.runs import (
    check_action,
    create_run,
    delete_run,
    disk_bytes,
    read_config,
    read_hits,
    read_log_tail,
    read_summary,
    read_tuning,
    rename_run,
    run_config,
    set_tuned_lr,
    write_summary,
)
from finetune_core.store.schema import (
    ACTIVE_STATES,
    CRASHED_MESSAGE,
    DRIFT_COLUMNS,
    DRIFT_SPLIT,
    FINAL_STATES,
    LIVE_STATES,
    METRIC_COLUMNS,
    RESUMABLE_STATES,
    RUN_ID_RE,
    SCHEMA_VERSION,
    STALLED,
    STATES,
    SUMMARY_KEYS,
    UNKNOWN,
    RunError,
)
from finetune_core.store.status import (
    any_queued,
    can_resume,
    heartbeat_interval_s,
    is_active,
    is_orphaned,
    read_status,
    record_crash,
    request_stop,
    set_state,
    shown_status,
    silent_for_s,
    stale_after_s,
    stop_requested_at,
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
    "ACTIVE_STATES",
    "COMPARE_COLUMNS",
    "CRASHED_MESSAGE",
    "DRIFT_COLUMNS",
    "DRIFT_SPLIT",
    "FINAL_STATES",
    "LIST_COLUMNS",
    "LIVE_STATES",
    "METRIC_COLUMNS",
    "RESUMABLE_STATES",
    "RUN_ID_RE",
    "SCHEMA_VERSION",
    "STALLED",
    "STATES",
    "SUMMARY_KEYS",
    "UNKNOWN",
    "access",
    "any_queued",
    "can_resume",
    "check_action",
    "MetricsWriter",
    "RunError",
    "RunReading",
    "clean_metric_records",
    "compare_runs",
    "create_run",
    "delete_run",
    "disk_bytes",
    "heartbeat_interval_s",
    "is_active",
    "is_orphaned",
    "is_run_dir",
    "list_runs",
    "new_group_id",
    "new_run_id",
    "read_config",
    "read_log_tail",
    "read_drift",
    "read_metrics",
    "read_run",
    "read_status",
    "record_crash",
    "request_stop",
    "read_hits",
    "read_predictions",
    "read_scored_images",
    "read_summary",
    "read_tuning",
    "quota",
    "set_tuned_lr",
    "rename_run",
    "resolve_run",
    "resolve_run_id",
    "run_config",
    "run_dirs",
    "runs_dir",
    "runs_table",
    "scored_images",
    "set_state",
    "shown_status",
    "signature",
    "silent_for_s",
    "stale_after_s",
    "stop_requested_at",
    "update_status",
    "write_progress",
    "write_status",
    "write_summary",
]
