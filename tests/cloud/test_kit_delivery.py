"""The kit delivery chain on the clouds, under Pulumi mocks: the stacks ship the wheel of this
checkout as encrypted objects in their own bucket, the node identity may read (not replace) them,
and the rendered bootstrap installs exactly that file, pinned by sha256, never `rlfleet` by name."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex

import pulumi
import pytest
import tomllib

from rlfleet.kit import build_kit
from rlfleet_cloud.kit import KIT_EXTRAS
from rlfleet_cloud.settings import StackConfigError, parse_settings

from .conftest import AWS_BASE, GCP_BASE, ROOT, Built, aws_program, build, gcp_program

KIT_PREFIX = "rlfleet/kit/"


@pytest.fixture(scope="module")
def kit():
    return build_kit(ROOT)  # the same cached build the programs make


# After `kit`: the program's own build follows at once (the same cache entry unless the checkout
# changed in between).
@pytest.fixture(scope="module")
def aws(kit) -> Built:
    return build(aws_program, AWS_BASE)


@pytest.fixture(scope="module")
def gcp(kit) -> Built:
    return build(gcp_program, GCP_BASE)


def _aws_scripts(stack: Built) -> list[str]:
    out = []
    for inst in stack.of("aws:ec2/instance:Instance"):
        doc = json.loads(inst.inputs["userData"].split("\n", 1)[1])
        out.append(doc["write_files"][0]["content"])
    return out


def _gcp_scripts(stack: Built) -> list[str]:
    return [vm.inputs["metadata"]["startup-script"] for vm in stack.of("gcp:compute/instance:Instance")]


def _params(script: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-Z_0-9]+)='([^']*)'$", script, re.M))


def pip_requirements(script: str) -> list[str]:
    """Every requirement a `pip install` in the script asks for, with the script's parameters expanded
    (so a requirement hidden in a variable counts too); option values (-c FILE) are not requirements."""
    params = _params(script)
    joined = script.replace("\\\n", " ")
    reqs = []
    for cmd in re.findall(r"pip\"? install ([^\n]*)", joined):
        expanded = re.sub(r"\$\{?([A-Z_0-9]+)\}?", lambda m: params.get(m.group(1), m.group(0)), cmd)
        tokens = shlex.split(expanded, comments=True)
        skip = False
        for tok in tokens:
            if skip:
                skip = False
            elif tok in ("-c", "--constraint", "-r", "--requirement", "-i", "--index-url", "--extra-index-url",
                         "-f", "--find-links"):
                skip = True
            elif not tok.startswith("-"):
                reqs.append(tok)
    return reqs


def _assert_pinned_file_install(script: str, uri_prefix: str, kit) -> None:
    p = _params(script)
    assert p["KIT_SHA256"] == kit.sha256 and p["KIT_CONSTRAINTS_SHA256"] == kit.constraints_sha256
    assert p["KIT_URI"] == f"{uri_prefix}{kit.object_prefix()}/{kit.wheel_name}"
    assert p["KIT_CONSTRAINTS_URI"] == f"{uri_prefix}{kit.object_prefix()}/constraints.txt"
    reqs = pip_requirements(script)
    ours = [r for r in reqs if re.match(r"rlfleet\b", r)]
    assert ours, f"the bootstrap installs no rlfleet at all: {reqs}"
    for req in ours:  # a direct reference: pip never looks the name up on an index
        assert re.fullmatch(r"rlfleet\[[a-z0-9,-]+\] @ file:///\S+\.whl", req.replace("${kit}", "/x").replace(
            "${KIT_WHEEL}", kit.wheel_name)), f"rlfleet installed by name: {req!r}"
    assert not any(r == "rlfleet" or (r.startswith(("rlfleet=", "rlfleet[")) and " @ " not in r) for r in reqs)
    assert "sha256sum" in script and "--index-url" not in script and "--extra-index-url" not in script


def test_aws_ships_the_wheel_as_encrypted_objects_in_the_stack_bucket(aws: Built, kit) -> None:
    objs = {o.inputs["key"]: o for o in aws.of("aws:s3/bucketObjectv2:BucketObjectv2")}
    bucket = aws.one("aws:s3/bucket:Bucket").state["bucket"]
    key_arn = aws.one("aws:kms/key:Key").state["arn"]
    wheel_key = f"{kit.object_prefix()}/{kit.wheel_name}"
    assert set(objs) == {wheel_key, f"{kit.object_prefix()}/constraints.txt"}
    assert wheel_key.startswith(KIT_PREFIX) and kit.wheel_name == f"rlfleet-{kit.version}-py3-none-any.whl"
    for key, obj in objs.items():
        i = obj.inputs
        assert i["bucket"] == bucket and i["serverSideEncryption"] == "aws:kms" and i["kmsKeyId"] == key_arn
        assert i["tags"]["rlfleet:stack"] == aws.outputs["stack_tag"] and i["tags"]["rlfleet:managed"] == "true"
        src = i["source"]
        assert isinstance(src, pulumi.FileAsset)
        expected = kit.wheel if key.endswith(".whl") else kit.constraints
        assert str(src.path) == str(expected)


def test_gcp_ships_the_wheel_as_cmek_objects_in_the_stack_bucket(gcp: Built, kit) -> None:
    objs = {o.inputs["name"]: o for o in gcp.of("gcp:storage/bucketObject:BucketObject")
            if o.inputs["name"].startswith(KIT_PREFIX)}
    bucket = gcp.one("gcp:storage/bucket:Bucket").inputs["name"]
    key_id = gcp.one("gcp:kms/cryptoKey:CryptoKey").state["id"]
    assert set(objs) == {f"{kit.object_prefix()}/{kit.wheel_name}", f"{kit.object_prefix()}/constraints.txt"}
    for name, obj in objs.items():
        assert obj.inputs["bucket"] == bucket and obj.inputs["kmsKeyName"] == key_id
        expected = kit.wheel if name.endswith(".whl") else kit.constraints
        assert str(obj.inputs["source"].path) == str(expected)


@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_bootstrap_installs_that_wheel_by_path_pinned_by_sha256(request, cloud: str, kit) -> None:
    stack: Built = request.getfixturevalue(cloud)
    if cloud == "aws":
        uri, scripts = f"s3://{stack.one('aws:s3/bucket:Bucket').state['bucket']}/", _aws_scripts(stack)
    else:
        uri, scripts = f"gs://{stack.one('gcp:storage/bucket:Bucket').inputs['name']}/", _gcp_scripts(stack)
    assert len(scripts) == 3  # head + 2 workers
    for script in scripts:
        _assert_pinned_file_install(script, uri, kit)
        assert _params(script)["KIT_EXTRAS"] == KIT_EXTRAS[cloud]


def _extra_requirements(extras: str) -> set[str]:
    """The distribution names that pip installs for ``rlfleet[<extras>]``, following the
    self-referencing extras (``rlfleet[s3]``) the way pip does."""
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names: set[str] = set()
    todo = [e.strip() for e in extras.split(",")]
    while todo:
        for req in table[todo.pop()]:
            m = re.match(r"([A-Za-z0-9_.-]+)(?:\[([^\]]*)\])?", req)
            assert m, req
            if m.group(1) == "rlfleet":
                todo += [e.strip() for e in (m.group(2) or "").split(",") if e.strip()]
            else:
                names.add(m.group(1).lower())
    return names


@pytest.mark.parametrize(("cloud", "driver"), [("aws", "s3fs"), ("gcp", "gcsfs")])
def test_nodes_install_the_store_driver_and_no_pulumi(cloud: str, driver: str) -> None:
    """A node runs runs, not 'pulumi up': the extras it installs with the kit carry the artifact
    store's driver and the agents, not the Pulumi SDK and providers (hundreds of MB per boot and
    code a node never needs)."""
    names = _extra_requirements(KIT_EXTRAS[cloud])
    assert driver in names and "torch" in names
    assert not {n for n in names if n.startswith("pulumi")}, sorted(names)


def test_the_gcp_extra_reads_a_gcp_secret_token_source() -> None:
    """'rlfleet target add gcp' names the token as gcp-secret:...; the extra a user installs for
    GCP carries the client that reads it (it failed with an ImportError before)."""
    assert "google-cloud-secret-manager" in _extra_requirements("gcp")


def test_pip_requirement_scan_catches_an_install_by_name() -> None:
    """The scanner above is what would catch a regression: it sees through variables."""
    old = "KIT_SPEC='rlfleet[agents,aws]==0.1.0'\n/opt/v/bin/pip install --quiet \"ray[default]==2\" \"${KIT_SPEC}\"\n"
    assert pip_requirements(old) == ["ray[default]==2", "rlfleet[agents,aws]==0.1.0"]


def _allowed(doc: dict, action: str, resource: str) -> bool:
    """IAM evaluation for Allow/Deny statements with wildcards (explicit deny wins)."""
    verdict = False
    for st in doc["Statement"]:
        acts = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        res = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        if any(fnmatch.fnmatchcase(action, a) for a in acts) and any(fnmatch.fnmatchcase(resource, r) for r in res):
            if st["Effect"] == "Deny":
                return False
            verdict = True
    return verdict


def test_aws_node_may_read_the_kit_but_not_replace_it(aws: Built) -> None:
    arn = aws.one("aws:s3/bucket:Bucket").state["arn"]
    doc = json.loads(aws.one("aws:iam/rolePolicy:RolePolicy").inputs["policy"])
    kit_obj = f"{arn}/{KIT_PREFIX}0123456789abcdef/rlfleet-0.1.0-py3-none-any.whl"
    assert _allowed(doc, "s3:GetObject", kit_obj)
    for act in ("s3:PutObject", "s3:DeleteObject"):
        assert not _allowed(doc, act, kit_obj), f"a node may {act} the kit"
        assert _allowed(doc, act, f"{arn}/rlfleet/runs/r1/metrics.jsonl")  # artifacts stay writable
    assert not _allowed(doc, "s3:GetObject", "arn:aws:s3:::someone-else/rlfleet/kit/x.whl")


def test_gcp_node_may_read_the_kit_but_not_replace_it(gcp: Built) -> None:
    bucket = gcp.one("gcp:storage/bucket:Bucket").inputs["name"]
    grants = {g.inputs["role"]: g.inputs for g in gcp.of("gcp:storage/bucketIAMMember:BucketIAMMember")
              if g.inputs["member"].startswith("serviceAccount:rlfleet-dev-node")}
    prefix = f'resource.name.startsWith("projects/_/buckets/{bucket}/objects/{KIT_PREFIX}")'
    assert grants["roles/storage.objectViewer"]["condition"]["expression"] == prefix
    assert grants["roles/storage.objectUser"]["condition"]["expression"] == f"!{prefix}"


def test_kit_spec_config_is_refused_with_the_way_out() -> None:
    with pytest.raises(StackConfigError, match=r"kit_spec.*pulumi config rm kit_spec"):
        parse_settings("aws", {"admin_cidrs": "203.0.113.0/24", "kit_spec": "rlfleet==0.1.0"}.get, stack="dev")


@pytest.mark.parametrize("project", ["aws", "gcp"])
def test_pulumi_program_venv_does_not_install_rlfleet_by_name(project: str) -> None:
    """`pulumi up` installs requirements.txt into the program's venv on the user's machine, with
    the user's cloud credentials at hand: rlfleet itself comes from the checkout, never an index."""
    lines = (ROOT / "infra_cloud" / project / "requirements.txt").read_text().splitlines()
    reqs = [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]
    named = [r for r in reqs if re.match(r"(?i)rlfleet([^a-z0-9_.-]|$)", r)]
    assert named == [], f"infra_cloud/{project}/requirements.txt asks an index for {named}"
    main = (ROOT / "infra_cloud" / project / "__main__.py").read_text()
    assert 'sys.path.insert(0, str(_here.parent.parent / "sdk"))' in main
