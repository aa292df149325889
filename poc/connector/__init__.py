"""The on-premise data connector: dials out, registers, serves its datasets through the tunnel."""
