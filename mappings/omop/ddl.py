"""The official OMOP CDM v5.4 PostgreSQL DDL (+ MI-CDM imaging extension), vendored in ``ddl/``.

Licences: OHDSI CDM (Apache-2.0, ``ddl/LICENSE``); MI-CDM (Apache-2.0, ``ddl/micdm/LICENSE.*``).
The scripts are used unchanged apart from the ``@cdmDatabaseSchema`` placeholder, in the order the
OHDSI instructions give: DDL → load → primary keys → constraints → indices (loading before the
foreign keys lets the vocabulary tables, which refer to each other, load in any order; adding the
constraints afterwards validates every row).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DDL_DIR = Path(__file__).resolve().parent / "ddl"
STEPS = ("ddl", "primary_keys", "constraints", "indices")
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def check_schema_name(schema: str) -> str:
    """A PostgreSQL schema name safe to interpolate (lower-case identifier)."""
    if not isinstance(schema, str) or not _IDENT.match(schema):
        raise ValueError("schema: a lower-case SQL identifier ([a-z_][a-z0-9_]*, ≤ 63 chars)")
    return schema


def script(step: str, schema: str) -> str:
    """The CDM + MI-CDM SQL of one step with ``@cdmDatabaseSchema`` replaced by ``schema``."""
    check_schema_name(schema)
    parts = [(DDL_DIR / f"OMOPCDM_postgresql_5.4_{step}.sql").read_text(encoding="utf-8")]
    parts.append((DDL_DIR / "micdm" / f"MICDM_postgresql_5.4_{step}.sql").read_text(encoding="utf-8"))
    return "\n".join(parts).replace("@cdmDatabaseSchema", schema)


def statements(step: str, schema: str) -> list[str]:
    """One SQL statement per entry (comments dropped)."""
    sql = script(step, schema)
    sql = re.sub(r"/\*.*?\*/", "", sql, flags=re.DOTALL)
    sql = "\n".join(line for line in sql.splitlines() if not line.strip().startswith("--"))
    return [s.strip() for s in sql.split(";") if s.strip()]


@dataclass(frozen=True, slots=True)
class ColumnDef:
    name: str
    type: str
    nullable: bool
    max_len: int | None


@lru_cache(maxsize=1)
def tables() -> dict[str, tuple[ColumnDef, ...]]:
    """Table name → columns in DDL order, parsed from the vendored DDL."""
    out: dict[str, tuple[ColumnDef, ...]] = {}
    for stmt in statements("ddl", "cdm"):
        m = re.match(r"CREATE TABLE cdm\.(\w+)\s*\((.*)\)\s*$", stmt, flags=re.DOTALL | re.IGNORECASE)
        if not m:
            continue
        cols = []
        for part in m.group(2).split(","):
            words = part.split()
            if len(words) < 2:
                continue
            typ = words[1].lower()
            ml = re.match(r"varchar\((\d+)\)", typ)
            cols.append(
                ColumnDef(
                    words[0].lower(), typ, "NOT" not in (w.upper() for w in words[2:]), int(ml.group(1)) if ml else None
                )
            )
        out[m.group(1).lower()] = tuple(cols)
    return out


def columns(table: str) -> tuple[str, ...]:
    return tuple(c.name for c in tables()[table])
