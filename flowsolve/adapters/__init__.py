"""Adapters: other libraries' models as ``fs.Model`` objects, so that any flowsolve solver runs under them.

Each adapter module adds its public names below (one import line per module).
"""
from __future__ import annotations
