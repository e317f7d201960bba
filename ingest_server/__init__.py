"""The receiving side's front door: an asyncssh SFTP/SCP server confined to account folders."""
