"""The one slug rule (rlfleet.constants.slug): what it makes is a valid GCP label value and AWS tag
value, whatever the input; stack ids made with it did not change (they tag live resources)."""

from __future__ import annotations

import random
import re

import pytest

from rlfleet.constants import SLUG_MAX, run_label, slug
from rlfleet.spec import RunSpec
from rlfleet.stack_outputs import make_stack_id

GCP_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")  # lowercase letters, digits, '_' and '-', <= 63
GCP_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")  # ... and a key starts with a letter
AWS_TAG_VALUE = re.compile(r"^[\w.:/=+\-@ ]{0,256}$")

ODD = ["", "   ", "CartPole-v1", "ALE/Pong-v5", "my_pkg.envs:GridWorld-v0", "Ünïcödé-Ümgebung", "--x--", "__x__",
       "2024_prod", "a" * 200, "-_-_-", "dev stack (eu)", "x" * 39 + "-y", "\x00\n\t", "日本語"]


def _random_texts(n: int = 400) -> list[str]:
    rnd = random.Random(13)
    alphabet = "aZ09_-. :/é日\t@!"
    return [''.join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 90))) for _ in range(n)]


@pytest.mark.parametrize("max_len", [1, 12, 40, SLUG_MAX])
def test_slugs_are_valid_gcp_label_values_and_aws_tag_values(max_len: int) -> None:
    for text in ODD + _random_texts():
        s = slug(text, max_len=max_len, fallback="run")
        assert GCP_LABEL_VALUE.fullmatch(s) and AWS_TAG_VALUE.fullmatch(s), (text, s)
        assert 1 <= len(s) <= max_len or s == "run", (text, s)
        assert s[0].isalnum() and s[-1].isalnum(), (text, s)  # no leading/trailing '-' or '_'


def test_slugs_behind_a_letter_prefix_are_valid_gcp_label_keys() -> None:
    for text in ODD + _random_texts():
        assert GCP_LABEL_KEY.fullmatch(f"r{slug(text, max_len=SLUG_MAX - 1)}"), text


def test_slug_examples_and_limits() -> None:
    assert slug("CartPole-v1") == "cartpole-v1"
    assert slug("my_pkg.envs:GridWorld-v0") == "my_pkg-envs-gridworld-v0"
    assert slug("!!!", fallback="stack") == "stack"
    assert slug("x" * 39 + "-y") == "x" * 39  # cut at 40, then the dangling '-' goes
    with pytest.raises(ValueError, match="max_len"):
        slug("x", max_len=64)


def test_run_labels_use_the_same_rule() -> None:
    assert RunSpec(kind="train", env="CartPole-v1").label == "ppo-cartpole-v1" == run_label(None, "ppo", "CartPole-v1")
    assert RunSpec(kind="train", name="mine").label == "mine"


@pytest.mark.parametrize(
    ("stack", "expected"),  # measured with the rule before it moved to rlfleet.constants
    [("dev", "dev-6aac06b8d156"), ("My_Dev.Stack", "my_dev-stack-d92242db2566"), ("__x__", "x-4280d048eba6"),
     ("2024-prod", "2024-prod-6e5022c6e67b"), ("a" * 60, "a" * 40 + "-73361fc475db"), ("!!!", "stack-93ad9dbd15ad")],
)
def test_stack_ids_did_not_change(stack: str, expected: str) -> None:
    assert make_stack_id(cloud="aws", account="123456789012", region="us-east-1", organization="org",
                         project="rlfleet-aws", stack=stack) == expected
