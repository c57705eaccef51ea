"""Hydra configs of a launch: config.yaml, one experiment from exp/ and one budget from budget/."""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
