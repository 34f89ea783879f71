"""Network: a VPC with one public subnet (or an existing VPC/subnet) and the cluster's security
group. SSH, the TLS API port and the deploy ports (TLS, the head's nginx) are open only to the admin
CIDRs; everything else only between cluster nodes."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from rlfleet_cloud.settings import ClusterSettings

from .common import tags


@dataclass
class NetworkArgs:
    settings: ClusterSettings


def ingress_rules(settings: ClusterSettings) -> list[dict]:
    """Admin ingress: one rule per control port, admin CIDRs only (world-open refused earlier)."""
    v4 = [c for c in settings.admin_cidrs if ":" not in c]
    v6 = [c for c in settings.admin_cidrs if ":" in c]
    rules: list[dict] = []
    serve = settings.serve_ports
    for first, last, what in ((22, 22, "SSH"), (settings.api_port, settings.api_port, "Ray Jobs API over TLS"),
                              (min(serve), max(serve), "deployed policies over TLS (the head's nginx)")):
        rule: dict = {"protocol": "tcp", "from_port": first, "to_port": last,
                      "description": f"{what} from admin CIDRs"}
        if v4:
            rule["cidr_blocks"] = v4
        if v6:
            rule["ipv6_cidr_blocks"] = v6
        rules.append(rule)
    rules.append({"protocol": "-1", "from_port": 0, "to_port": 0, "self": True,
                  "description": "intra-cluster (Ray GCS, object store, metrics)"})
    return rules


class Network(pulumi.ComponentResource):
    vpc_id: pulumi.Output[str]
    subnet_id: pulumi.Output[str]
    security_group_id: pulumi.Output[str]

    def __init__(self, name: str, args: NetworkArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("rlfleet:aws:Network", name, None, opts)
        s = args.settings
        child = pulumi.ResourceOptions(parent=self)
        if s.existing_network:
            vpc_id: pulumi.Input[str] = s.existing_network
            subnet_id: pulumi.Input[str] = s.existing_subnet or ""
        else:
            vpc = aws.ec2.Vpc(f"{name}-vpc", cidr_block=s.network_cidr, enable_dns_hostnames=True,
                              enable_dns_support=True, tags=tags(s, "vpc"), opts=child)
            igw = aws.ec2.InternetGateway(f"{name}-igw", vpc_id=vpc.id, tags=tags(s, "igw"), opts=child)
            subnet = aws.ec2.Subnet(f"{name}-subnet", vpc_id=vpc.id, cidr_block=s.subnet_cidr,
                                    availability_zone=s.zone or None, map_public_ip_on_launch=False,
                                    tags=tags(s, "subnet"), opts=child)
            rt = aws.ec2.RouteTable(f"{name}-rt", vpc_id=vpc.id,
                                    routes=[{"cidr_block": "0.0.0.0/0", "gateway_id": igw.id}],
                                    tags=tags(s, "rt"), opts=child)
            aws.ec2.RouteTableAssociation(f"{name}-rta", subnet_id=subnet.id, route_table_id=rt.id, opts=child)
            vpc_id, subnet_id = vpc.id, subnet.id
        sg = aws.ec2.SecurityGroup(
            f"{name}-sg",
            vpc_id=vpc_id,
            description=f"rlfleet {s.stack}: admin access to SSH and the TLS API; intra-cluster traffic",
            ingress=ingress_rules(s),
            egress=[{"protocol": "-1", "from_port": 0, "to_port": 0, "cidr_blocks": ["0.0.0.0/0"],
                     "description": "package installs, AWS APIs"}],
            tags=tags(s, "sg"),
            opts=child,
        )
        self.vpc_id = pulumi.Output.from_input(vpc_id)
        self.subnet_id = pulumi.Output.from_input(subnet_id)
        self.security_group_id = sg.id
        self.register_outputs({"vpc_id": self.vpc_id, "subnet_id": self.subnet_id, "security_group_id": sg.id})
