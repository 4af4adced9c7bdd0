"""Config files for train.py and eval.py (``--config=configs/<name>.py``); each edits a default."""
