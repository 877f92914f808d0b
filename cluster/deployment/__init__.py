"""Deployment: the Serve application, its deployments, a local cluster, node drain, autoscaling."""
