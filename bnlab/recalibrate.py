"""Learners' path ``bnlab.recalibrate``: the module is :mod:`bnlab.inference.recalibrate`."""

from bnlab._alias import alias

alias(__name__, "bnlab.inference.recalibrate")
