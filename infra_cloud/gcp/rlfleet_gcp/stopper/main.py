"""Cloud Function: stop the VM named in a Cloud Monitoring incident (idle alert → Pub/Sub).

Deployed by the rlfleet GCP stack; its service account may only stop/get this stack's VMs.
"""

import base64
import json
import os

from google.cloud import compute_v1

STACK = os.environ["RLFLEET_STACK"]


def stop_idle(event, context=None):  # Pub/Sub CloudEvent payload
    data = event.data if hasattr(event, "data") else event
    raw = data["message"]["data"] if "message" in data else data["data"]
    incident = json.loads(base64.b64decode(raw)).get("incident", {})
    if incident.get("state") != "open":
        return "ignored: not an open incident"
    labels = incident.get("resource", {}).get("labels", {})
    project, zone, instance = labels.get("project_id"), labels.get("zone"), labels.get("instance_id")
    if not (project and zone and instance):
        return "ignored: incident has no instance"
    client = compute_v1.InstancesClient()
    vm = client.get(project=project, zone=zone, instance=instance)
    if vm.labels.get("rlfleet-stack") != STACK:
        return f"ignored: {vm.name} is not in stack {STACK}"
    client.stop(project=project, zone=zone, instance=vm.name)
    return f"stopping {vm.name}"
