"""Data tools: download the official shards (download.py), turn text into shards (prepare.py)."""
