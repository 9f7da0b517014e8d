"""Local lm-eval tasks, always on lm-eval's include path (recipes name them directly); see nextline.py."""

from pathlib import Path

TASKS_DIR = Path(__file__).parent
