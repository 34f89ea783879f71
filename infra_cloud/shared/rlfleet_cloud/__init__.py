"""Code shared by the AWS and GCP Pulumi programs: config validation and the node bootstrap.

Imports only the standard library and :mod:`rlfleet.stack_outputs` (no pulumi, no heavy rlfleet
modules), so it is cheap to import and testable without a Pulumi engine.
"""
