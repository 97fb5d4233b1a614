"""Launching: submitit executors behind one Launcher interface, and the submit/wait orchestration."""
