"""Data tools: download the published shards (download.py, through huggingface_hub), turn text into
shards (prepare.py, with the CaseOps transform of caseops.py and its byte sidecars), smoke data
(synthetic.py)."""
