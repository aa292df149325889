"""Thin adapters that move the protocol core's messages over a real connection."""
