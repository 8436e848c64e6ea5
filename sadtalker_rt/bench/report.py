"""The JSON report: plain JSON numbers (non-finite ones as strings) and its JSON Schema (report.schema.json)."""
from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 2
SCHEMA_FILE = Path(__file__).with_name("report.schema.json")



def to_json_ready(value):
    """Non-finite floats become the strings "inf", "-inf" and "nan" (JSON has no such numbers); numpy scalars
    become Python ones."""
    if isinstance(value, dict):
        return {str(k): to_json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_ready(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def write_json(report: dict, path: Path) -> None:
    import json

    Path(path).write_text(json.dumps(to_json_ready(report), indent=2, allow_nan=False) + "\n")


@lru_cache(maxsize=1)
def schema() -> dict:
    """The JSON Schema (draft 2020-12) of the report, from the package's report.schema.json."""
    return json.loads(SCHEMA_FILE.read_text())
