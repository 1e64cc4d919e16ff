"""Calls sys.exit while it is imported: lint must report it, not exit."""
import sys

sys.exit(3)
