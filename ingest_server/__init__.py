"""The receiving side's front door: an asyncssh SFTP/SCP server confined to account folders.

Modules, in the order a connection meets them:

- ``server``: the listener's lifecycle (listen, accept, admit, hand over, graceful shutdown);
- ``proxy_protocol``: the PROXY v1/v2 header from a configured load balancer;
- ``gate``, ``connection_rate``: the IP gate, connection limits and the rate of new
  connections per address, before any SSH byte is sent;
- ``defender``: brute-force scores and persistent bans;
- ``worker_pool``, ``worker_channel``, ``worker``: session processes and how the listener
  hands them sockets (each connection numbered, released exactly once);
- ``ledger``: sessions per account and quota reservations, kept by the listener for every
  worker;
- ``session_host``: asyncssh on an admitted socket, and draining sessions at shutdown;
- ``connection``: one connection's policy (key-only auth, forwarding refused, shell refused),
  its channels and idle time; ``session_budget``: what one connection may hold at once;
- ``sftp``: the account's file system for SFTP and legacy SCP (chroot, read-only files);
  ``sftp_compat``: the bytes rclone leaves after a WRITE's data, dropped as OpenSSH does;
- ``atomic_upload`` and ``limits``: an upload in flight and the limits it runs under;
- ``host_keys``: the server's ed25519 and RSA 4096 host keys;
- ``admin``: the HTTP listener for ``/metrics`` and ``/healthz``; ``activity``: an account's
  recent events for ``ingestctl activity``.

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
- Sessions are made in ``SSHServer.session_requested`` (not with ``sftp_factory``), so
  channels can be counted: it returns an ``asyncssh.SSHServerProcess`` built with our SFTP
  factory, which asyncssh itself uses for SFTP and SCP when a process factory is set
  (``test_session_budgets``).
- A closed folder handle is simply dropped by asyncssh (no hook): the ``_Listing`` object
  gives its place in the handle budget back when it is freed, and ``exit()`` gives back any
  left (``test_session_budgets``).
- An SFTP channel's bytes reach asyncssh's SFTP handler through the session's
  ``data_received``; ``sftp_compat`` trims there for Go clients, and a test fails when a
  future asyncssh starts accepting rclone's packets itself (``test_sftp_compat``).
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
