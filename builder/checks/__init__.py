"""The parts of `gpubuild check` (builder/check.py is the entry point)."""
