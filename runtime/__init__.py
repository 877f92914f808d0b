"""The runtime every process of the cluster shares: settings, metrics, the Redis connection and what lives
in Redis (worker registry, sessions, a worker's membership). It imports neither the data plane (actors)
nor the control plane (cluster)."""
