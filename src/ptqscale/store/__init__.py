"""The results store: one JSON record per job, the source of truth of every study.

Layout under a results root::

    <root>/<study>/records/<job_key>.json   one record per job (complete or failed)
    <root>/<study>/records.parquet          consolidation of the above (``consolidate``)
    <root>/_cache/<kind>/<key>.json         model-level results shared across jobs
    <root>/<study>/claims/<job_key>.lock    held by the process running the job (``claim_job``)

Every write is atomic (a temporary file of its own in the same folder, fsync, rename),
so a job killed at any point leaves either the previous file or the new one, never half
of one, and concurrent writers never share a temporary file. A corrupt file (bad JSON,
missing fields, unreadable Parquet) is named in one log line and read as absent; where
it is about to be recomputed it is first moved aside to ``<name>.corrupt-<time>``
(ptqscale/files.py). The layout of a record is ``Record`` in store/schema.py, versioned by
``RECORD_SCHEMA_VERSION``: the writer stamps it, readers upgrade older records. This module
imports no torch and of the package only ptqscale.files: the analysis package reads records
through :func:`read_records` alone.

Example::

    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> _ = write_record(root, {"job_key": "ab12", "study": "demo", "status": "complete",
    ...                     "metrics": {"nll": 2.5}})
    >>> read_records(root)["metrics.nll"].tolist()
    [2.5]
"""

from ptqscale.files import atomic_write_json, atomic_write_text, locked, quarantine
from ptqscale.store.claims import claim_job, running_claims
from ptqscale.store.records import (
    cache_get,
    cache_put,
    check_study,
    consolidate,
    iter_records,
    read_record,
    read_records,
    record_path,
    record_states,
    write_record,
)
from ptqscale.store.schema import (
    RECORD_SCHEMA_VERSION,
    Record,
    RecordSchemaError,
    job_config,
    upgrade,
)

__all__ = [
    "RECORD_SCHEMA_VERSION",
    "Record",
    "RecordSchemaError",
    "atomic_write_json",
    "atomic_write_text",
    "cache_get",
    "check_study",
    "cache_put",
    "claim_job",
    "consolidate",
    "iter_records",
    "job_config",
    "locked",
    "quarantine",
    "read_record",
    "read_records",
    "record_path",
    "record_states",
    "running_claims",
    "upgrade",
    "write_record",
]
