"""The pieces train.py sets up before its loop: optimizer and schedule, metrics and logging."""
