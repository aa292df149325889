"""Helper processes: the product's components started as real processes and sampled, Redis, PostgreSQL, several gateway replicas, a throwaway PKI."""
