"""Imported by Python at start-up when this folder is on PYTHONPATH (see tests/small_disk.py)."""

import small_disk

small_disk.install_from_env()
