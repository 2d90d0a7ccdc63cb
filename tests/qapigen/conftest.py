"""Puts schema/ on sys.path so the tests import the qapigen package from the tree."""

import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "schema"))
