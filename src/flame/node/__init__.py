"""The analysis node runtime: epoch loop, result delivery, status board, context, mailbox."""
