"""Shared ground floor of sis-ingest: settings, control DB, registry, policies, folder layout."""
