"""Typed messages and their serialisation: everything that crosses a party boundary.

Also :mod:`clicooper.common.files`, the one safe writer for secrets, keys and weights.
"""
