"""The analysis node runtime: epoch loop, result delivery, failure reports, the aggregator
watch, status board, context, mailbox."""
