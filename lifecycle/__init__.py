"""rkel: Kubernetes cluster lifecycle from an RKE-format cluster.yml."""

__version__ = "0.1.0"
