"""lm-eval task YAMLs, their offline data (JSONL) and glue (`utils.py`); the folder is on lm-eval's include path."""
