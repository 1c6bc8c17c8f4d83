"""Snapshots: taking, committing, discovering, verifying, restoring and proving them (see manager.py)."""
