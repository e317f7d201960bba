"""The receiving side's front door: an asyncssh SFTP/SCP server confined to account folders.

Modules, in the order a connection meets them:

- ``server``: the listener's lifecycle (listen, accept, admit, hand over, graceful shutdown);
- ``proxy_protocol``: the PROXY v1/v2 header from a configured load balancer;
- ``gate``: the IP gate and connection limits, before any SSH byte is sent;
- ``defender``: brute-force scores and persistent bans;
- ``worker_pool``, ``worker_channel``, ``worker``: session processes and how the listener
  hands them sockets;
- ``session_host``: asyncssh on an admitted socket, and draining sessions at shutdown;
- ``connection``: one connection's policy (key-only auth, forwarding refused, shell refused);
- ``sftp``: the account's file system for SFTP and legacy SCP (chroot, read-only files);
- ``atomic_upload`` and ``limits``: an upload in flight and the limits it runs under;
- ``host_keys``: the server's ed25519 and RSA 4096 host keys.

Where we lean on asyncssh (2.24) behaviour that is not a documented promise, each pinned by
a test in ``tests/server/``:

- ``SFTPServer.close()`` is called both for a client's CLOSE and for handles left open when a
  session dies; only the latter runs while an exception is being handled, which is how an
  upload is told apart from an aborted one (``test_interrupted_uploads``).
- asyncssh offers no hook that reveals which algorithm a client signed with. Its
  ``SSHKey.verify`` checks the signature algorithm against the key's
  ``all_sig_algorithms``; narrowing that set on the key object passed to
  ``validate_public_key`` refuses SHA-1 ``ssh-rsa`` signatures (``test_gate_auth``, curl).
- ``listen()``/``run_server()`` take no host key algorithm list; trimming
  ``host_key_algorithms`` on the loaded key pair stops the RSA host key offering SHA-1
  ``ssh-rsa`` (``test_ssh_audit``).
- The server hides its library in the SSH banner, but asyncssh's SFTP ``vendor-id``
  extension still names AsyncSSH and its version to authenticated clients; changing it
  would mean patching asyncssh, which we do not do.
- OpenSSH clients keep Nagle on for non-interactive sessions, so during the handshake a small
  packet that follows an unacknowledged one waits for our ~40 ms delayed ACK (after KEXINIT
  and after NEWKEYS: ~80 ms of a ~100 ms login). asyncssh has no hook per received packet,
  so ``connection.HandshakeAcks`` sets Linux ``TCP_QUICKACK`` on the socket (public through
  ``conn.get_extra_info("socket")`` in ``connection_made``) every 4 ms until authentication
  completes (2 s at most): each setting sends a pending ACK at once and leaves the kernel's
  delayed-ACK mode until we next send. ~3x the sessions/s, no measurable CPU
  (``test_handshake_acks`` counts the kernel's DelayedACKs in a network namespace).
"""
