"""Small helpers with no role of their own: deadlines, redaction, signals, log set-up."""
