"""Synthetic tasks that show quality differences between mixers: :mod:`dplr.tasks.mqar`."""

from . import mqar

__all__ = ["mqar"]
