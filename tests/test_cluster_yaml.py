"""cluster.yaml is a valid Ray cluster-launcher config and says what the README promises.

Validation is Ray's own, offline: `prepare_config` (merge with the AWS provider's defaults.yaml, check the docker
section) then `validate_config`, which checks the config against ray/autoscaler/ray-schema.json shipped inside the
installed `ray` and the cross-field rules (head type exists, min_workers sum). `ray up` runs the same two before
it talks to the cloud.
"""

import copy
import json
import re
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
TORCH_PIN = "torch==2.13.0"


def raw_config() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def validate(config: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def config():
    return raw_config()


def _workers(config: dict) -> dict:
    return {n: t for n, t in config["available_node_types"].items() if n != config["head_node_type"]}


def test_validates_against_the_schema_shipped_in_ray(config):
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(config, json.loads(schema_path.read_text()))  # the file as written
    prepared = validate(config)  # and what `ray up` builds from it
    assert prepared["head_node_type"] == "head"


def test_image_is_the_plain_ray_gpu_image_of_the_installed_ray_and_python(config):
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-{py}-gpu"
    assert not {"head_image", "worker_image"} & set(config["docker"])  # one image everywhere


def test_cpu_head_and_autoscaling_gpu_workers_for_caching_and_training(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0
    assert not re.match(r"(g|p)\d", head["node_config"]["InstanceType"])  # not a GPU instance family
    workers = _workers(config)
    assert {"gpu_cache_workers", "gpu_train_workers"} <= set(workers)
    for name, t in workers.items():
        assert t["min_workers"] == 0 and t["max_workers"] >= 1, name
        assert t["resources"]["GPU"] >= 1, name
        assert t["node_config"]["IamInstanceProfile"]["Arn"].endswith(":instance-profile/er-ray-node"), name
    # training gangs need several GPUs of one node; caching goes wide on single-GPU nodes
    assert workers["gpu_train_workers"]["resources"]["GPU"] > workers["gpu_cache_workers"]["resources"]["GPU"] == 1
    assert sum(t["min_workers"] for t in workers.values()) == 0 < config["max_workers"]


def test_setup_installs_the_cuda_torch_first_then_er_ray_constrained_to_it(config):
    cmds = config["setup_commands"]
    torch_at = next(i for i, c in enumerate(cmds) if re.fullmatch(rf"pip install {re.escape(TORCH_PIN)}", c))
    pin_at = next(i for i, c in enumerate(cmds) if f'"{TORCH_PIN}" > ~/torch-pin.txt' in c)
    er_ray_at = next(i for i, c in enumerate(cmds) if "pip install" in c and "er_ray" in c)
    assert torch_at < pin_at < er_ray_at
    assert "-c ~/torch-pin.txt" in cmds[er_ray_at]
    # PyPI's default Linux wheel is the CUDA build: no CPU index anywhere
    assert not any("download.pytorch.org" in c or "--index-url" in c for c in cmds)
    assert any(c.startswith("er-ray fetch") for c in cmds[er_ray_at:])


def test_dashboard_and_job_server_on_loopback_with_token_auth(config):
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in (REPO / "cluster.yaml").read_text()
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


BROKEN = {  # what is broken: (how, what Ray says)
    "a misspelt top-level key": (lambda c: c.update(setup_command=c.pop("setup_commands")),
                                 "'setup_command' was unexpected"),
    "a misspelt node type key": (lambda c: c["available_node_types"]["gpu_cache_workers"].update(
        min_worker=c["available_node_types"]["gpu_cache_workers"].pop("min_workers")), "'min_worker' was unexpected"),
    "a node type without node_config": (lambda c: c["available_node_types"]["gpu_train_workers"].pop("node_config"),
                                        "'node_config' is a required property"),
    "a fractional GPU count": (lambda c: c["available_node_types"]["gpu_cache_workers"]["resources"].update(GPU=0.5),
                               "0.5 is not of type 'integer'"),
    "an unknown docker option": (lambda c: c["docker"].update(shm_size="16g"), "'shm_size' was unexpected"),
    "a head type that does not exist": (lambda c: c.update(head_node_type="cpu_head"),
                                        "`head_node_type` must be one of"),
    "more min_workers than max_workers": (lambda c: c["available_node_types"]["gpu_cache_workers"].update(
        min_workers=c["max_workers"] + 1), "smaller than the sum of `min_workers`"),
}


@pytest.mark.parametrize("what", list(BROKEN))
def test_a_broken_config_fails_validation(what):
    config = raw_config()
    break_it, message = BROKEN[what]
    break_it(config)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(message)):
        validate(config)
