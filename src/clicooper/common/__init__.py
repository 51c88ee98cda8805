"""Typed messages and their serialisation: everything that crosses a party boundary."""
