"""The sending side: scheduled SFTP pushes with Test and Save, fingerprint pinning, classified
failures and e-mail notifications (``ingest-push``). Imports ``ingest_core`` only."""
