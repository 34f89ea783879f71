"""rlfleet's GCP cluster: typed Pulumi components (see ../__main__.py)."""
