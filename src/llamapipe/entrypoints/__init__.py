"""Script files for launchers that start a path, not a module (see cli_script.py)."""
