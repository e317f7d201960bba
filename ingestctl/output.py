"""Re-export of ingest_core.console while modules move over (one implementation)."""

from ingest_core.console import print_fields, print_json, print_table, to_jsonable, warn

__all__ = ["print_fields", "print_json", "print_table", "to_jsonable", "warn"]
