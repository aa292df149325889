"""The cloud gateway: tenant registry, tunnel links, Flight server and health endpoint."""
