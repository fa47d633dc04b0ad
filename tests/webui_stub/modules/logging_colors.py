"""webui's logger (modules/logging_colors.py:3): a plain ``logging`` logger named 'textgen'.

webui installs a Rich handler on it; tests only need the name so that ``caplog`` sees records.
"""
import logging

logger = logging.getLogger('textgen')
