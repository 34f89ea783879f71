"""rlfleet's AWS cluster: typed Pulumi components (see ../__main__.py)."""
