"""What travels: the signed binary envelope, tables as Arrow IPC, chunk framing."""
