"""Training tests share the stand-in model and loader of ``standins.py`` beside this file."""

import sys
from pathlib import Path

# pytest runs in importlib mode (the test tree repeats basenames), which adds no test folder to sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
