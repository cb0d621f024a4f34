"""trio-tproxy: a transparent mutual-TLS sidecar for Kubernetes pods."""

__version__ = "0.1.0"
