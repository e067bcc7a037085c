"""gpubuild: GPU Python dependencies for Ray on Kubernetes, resolved once, unpacked in seconds."""

__version__ = "0.1.0"
