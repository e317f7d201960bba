"""The nightly loader: file specs, validation, the SIS database, schedules, pool files."""
