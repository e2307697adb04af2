"""The results store: one JSON record per job, the source of truth of every study.

Layout under a results root::

    <root>/<study>/records/<job_key>.json   one record per job (complete or failed)
    <root>/<study>/records.parquet          consolidation of the above (``consolidate``)
    <root>/_cache/<kind>/<key>.json         model-level results shared across jobs

Every write is atomic (temporary file in the same folder, fsync, rename), so a job
killed at any point leaves either the previous file or the new one, never half of
one. This module imports neither torch nor the rest of the package: the analysis
package reads records through :func:`read_records` alone.

Example::

    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> write_record(root, {"job_key": "ab12", "study": "demo", "status": "complete",
    ...                     "metrics": {"nll": 2.5}})
    >>> read_records(root)["metrics.nll"].tolist()
    [2.5]
"""

from ptqscale.store.records import (
    RECORD_SCHEMA_VERSION,
    atomic_write_json,
    cache_get,
    cache_put,
    consolidate,
    iter_records,
    read_record,
    read_records,
    record_path,
    write_record,
)

__all__ = [
    "RECORD_SCHEMA_VERSION",
    "atomic_write_json",
    "cache_get",
    "cache_put",
    "consolidate",
    "iter_records",
    "read_record",
    "read_records",
    "record_path",
    "write_record",
]
