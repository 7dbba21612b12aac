"""Cluster definitions under cluster/: parsed and validated offline, with Ray's own code.

The launcher YAML goes through `prepare_config` + `validate_config` (what `ray up` runs before it
talks to the cloud); the KubeRay RayCluster (and the RayJob's cluster) through the Ray
autoscaler's own translation of a RayCluster CR, which validates its result the same way.
No cloud credentials, Kubernetes or network needed. The object-storage variants (`*-s3.yaml`: no
shared volume, the AWS variables wired, an MLflow server whose artifacts go to S3) pass the same
checks and are compared with the shared-storage definitions key by key.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER = CLUSTER / "ray-cluster.yaml"
KUBERAY = CLUSTER / "kuberay"
RAYCLUSTER = KUBERAY / "raycluster.yaml"
RAYJOB = KUBERAY / "rayjob.yaml"
RUNTIME_ENV = KUBERAY / "runtime-env.yaml"
STORAGE = KUBERAY / "shared-storage.yaml"
LAUNCHER_S3 = CLUSTER / "ray-cluster-s3.yaml"
RAYCLUSTER_S3 = KUBERAY / "raycluster-s3.yaml"
RAYJOB_S3 = KUBERAY / "rayjob-s3.yaml"
MLFLOW_S3 = KUBERAY / "mlflow-s3.yaml"
LAUNCHERS = [LAUNCHER, LAUNCHER_S3]
AWS_SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")  # from a Secret, optional

SHARED_MOUNT = "/mnt/shared"
POOLS = {"cpu_pool": "CPU", "gpu_pool": "GPU"}  # custom resource -> the resource it counts
LAUNCHER_GROUP = {"cpu_pool": "cpu_worker", "gpu_pool": "gpu_worker"}
KUBERAY_GROUP = {"cpu_pool": "cpu-pool", "gpu_pool": "gpu-pool"}


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _ray_major_minor() -> tuple[int, int]:
    import ray

    major, minor = ray.__version__.split(".")[:2]
    return int(major), int(minor)


def _image_major_minor(image: str) -> tuple[int, int]:
    match = re.fullmatch(r"rayproject/ray(?:-ml)?:(\d+)\.(\d+)\.\d+(?:-[\w.]+)*", image)
    assert match, f"not a versioned rayproject image: {image}"
    return int(match.group(1)), int(match.group(2))


def _pinned(package: str) -> str:
    """The version pyproject.toml pins for package (torch, torchvision)."""
    match = re.search(rf'"{re.escape(package)}==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert match, f"pyproject.toml pins no {package}"
    return match.group(1)


def _cluster_specs() -> dict[str, dict]:
    """RayCluster specs to check: the long-lived cluster and the RayJob's cluster, each on shared
    storage and on object storage."""
    return {
        "raycluster": _load(RAYCLUSTER)["spec"],
        "rayjob": _load(RAYJOB)["spec"]["rayClusterSpec"],
        "raycluster-s3": _load(RAYCLUSTER_S3)["spec"],
        "rayjob-s3": _load(RAYJOB_S3)["spec"]["rayClusterSpec"],
    }


ALL_SPECS = ["raycluster", "rayjob", "raycluster-s3", "rayjob-s3"]


def _groups(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]]


def _containers(spec: dict) -> list[dict]:
    return [c for group in _groups(spec) for c in group["template"]["spec"]["containers"]]


def _derive_autoscaling_config(spec: dict, name: str) -> dict:
    """Ray's KubeRay autoscaler view of a RayCluster spec (validated inside by validate_config)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": name, "namespace": "default"}}
    return _derive_autoscaling_config_from_ray_cr({**cr, "spec": copy.deepcopy(spec)})


def _runtime_env_fields() -> set[str]:
    """The runtime_env fields Ray knows (RuntimeEnv itself only warns on unknown ones)."""
    from ray.runtime_env import RuntimeEnv

    return set(RuntimeEnv.known_fields)


def _runtime_env_of_job(path: Path = RAYJOB) -> dict:
    return yaml.safe_load(_load(path)["spec"]["runtimeEnvYAML"])


def _vlm_commands(text: str) -> list[list[str]]:
    """The `vlm ...` commands in a shell text (`&&` chains, `ray job submit ... -- vlm ...`)."""
    text = text.replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        for part in re.split(r"&&|;", line):
            words = shlex.split(part, comments=True)
            if "--" in words and "vlm" in words[words.index("--") + 1 :]:
                words = words[words.index("--") + 1 :]
            if words[:1] == ["vlm"]:
                commands.append(words[1:])
    return commands


def _check_vlm_command(argv: list[str]) -> None:
    """Parse argv with the real `vlm` parser and resolve its config + overrides."""
    from pipelines.cli import build_parser
    from vlm.config import load_config

    args = build_parser().parse_args(argv)
    config = (ROOT / args.config) if getattr(args, "config", None) else None
    if config is not None:
        assert config.is_file(), f"vlm {' '.join(argv)}: no config file {args.config}"
    if args.command == "ingest":
        from pipelines.ingest import IngestConfig as cls
    elif args.command == "train" and args.model == "clip":
        from pipelines.train_clip import TrainClipConfig as cls
    else:
        return
    cfg = load_config(cls, config, args.overrides)
    for pool in getattr(getattr(cfg, "scaling", None), "resources_per_worker", None) or {}:
        assert pool in POOLS, f"vlm {' '.join(argv)}: {pool} is no pool of the cluster definitions"


# ---------------------------------------------------------------------------------------------
# all files


def test_cluster_yamls_parse():
    """Every YAML file under cluster/ parses into mappings with content."""
    paths = sorted(CLUSTER.rglob("*.yaml"))
    assert {LAUNCHER, RAYCLUSTER, RAYJOB, RUNTIME_ENV, STORAGE} <= set(paths)
    assert {LAUNCHER_S3, RAYCLUSTER_S3, RAYJOB_S3, MLFLOW_S3} <= set(paths)
    for path in paths:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) and d for d in docs), path


# ---------------------------------------------------------------------------------------------
# cluster launcher


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_passes_ray_validation(path):
    """The launcher YAML passes Ray's prepare_config + validate_config, as `ray up` runs them."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(path)
    prepared = prepare_config(config)
    validate_config(prepared)
    assert prepared["provider"]["type"] == config["provider"]["type"] == "aws"
    assert set(prepared["available_node_types"]) == {"head", "cpu_worker", "gpu_worker"}


def test_launcher_validation_rejects_a_misspelled_field():
    """Ray's validation is live: a misspelled node-type field fails it."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(LAUNCHER)
    config["available_node_types"]["gpu_worker"]["max_worker"] = 8
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_pools_and_bounds(path):
    """Head takes no work; CPU and GPU pools scale from 0 within bounds and carry their pool resource."""
    config = _load(path)
    types = config["available_node_types"]
    assert config["head_node_type"] == "head"
    assert types["head"]["resources"].get("CPU") == 0
    assert types["head"].get("max_workers", 0) == 0
    for pool, counted in POOLS.items():
        node = types[LAUNCHER_GROUP[pool]]
        assert 0 <= node["min_workers"] <= node["max_workers"], pool
        assert node["max_workers"] > 0, pool
        # one pool unit per CPU / GPU of the node: stages ask for one unit per CPU / GPU they take
        assert node["resources"][pool] == node["resources"][counted] > 0, pool
    assert "GPU" not in types["cpu_worker"]["resources"] or types["cpu_worker"]["resources"]["GPU"] == 0
    assert "gpu_pool" not in types["cpu_worker"]["resources"] and "cpu_pool" not in types["gpu_worker"]["resources"]
    assert sum(t.get("min_workers", 0) for t in types.values()) <= config["max_workers"]
    assert config["max_workers"] >= sum(t.get("max_workers", 0) for t in types.values())
    assert config["idle_timeout_minutes"] > 0


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_images_match_installed_ray(path):
    """The launcher's Docker images carry the installed Ray's major.minor; the GPU pool gets the -gpu image."""
    config = _load(path)
    docker = config["docker"]
    images = {docker["image"]} | {
        t["docker"]["worker_image"]
        for t in config["available_node_types"].values()
        if "worker_image" in t.get("docker", {})
    }
    for image in images:
        assert _image_major_minor(image) == _ray_major_minor(), image
    assert config["available_node_types"]["gpu_worker"]["docker"]["worker_image"].endswith("-gpu")
    assert not docker["image"].endswith("-gpu")


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_installs_the_project(path):
    """Setup syncs the working tree and installs the README's torch pin, then the project, editable."""
    config = _load(path)
    remote = next(r for r, local in config["file_mounts"].items() if local == ".")
    assert (ROOT / "pyproject.toml").is_file()  # "." is the repository root `ray up` runs from
    cmds = config["setup_commands"]
    torch_pin = f"pip install torch=={_pinned('torch')} torchvision=={_pinned('torchvision')}"
    assert torch_pin in cmds
    assert f"pip install -e {remote}" in cmds
    assert cmds.index(torch_pin) < cmds.index(f"pip install -e {remote}")
    assert ".gitignore" in config["rsync_filter"]  # .venv, outputs, ... stay local


def test_launcher_start_commands_and_environment():
    """Ray starts with the dashboard on 0.0.0.0, token auth on every node, MLflow and shared storage set."""
    config = _load(LAUNCHER)
    head = " ".join(config["head_start_ray_commands"])
    workers = " ".join(config["worker_start_ray_commands"])
    assert "ray start --head" in head and "--dashboard-host=0.0.0.0" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in workers
    run_options = " ".join(config["docker"]["run_options"])
    assert "--env RAY_AUTH_MODE=token" in run_options
    assert re.search(r"--env MLFLOW_TRACKING_URI=\S+", run_options)
    assert f"--volume {SHARED_MOUNT}:{SHARED_MOUNT}" in run_options
    assert any(f"{SHARED_MOUNT}" in c and "mount" in c for c in config["initialization_commands"])
    # the token is made on the head before Ray starts there, and copied to workers before theirs
    cmds = config["head_start_ray_commands"]
    generate = next(i for i, c in enumerate(cmds) if "ray get-auth-token --generate" in c)
    assert generate < next(i for i, c in enumerate(cmds) if "ray start --head" in c)
    assert "~/.ray/auth_token" in config["cluster_synced_files"]


def _without_storage(config: dict) -> dict:
    """A launcher config less what the storage choice changes: name, shared mount, AWS env, instance profiles."""
    config = copy.deepcopy(config)
    del config["cluster_name"], config["initialization_commands"]
    config["docker"]["run_options"] = [
        o for o in config["docker"]["run_options"] if not o.startswith(("--volume", "--env AWS_"))
    ]
    for node in config["available_node_types"].values():
        node["node_config"].pop("IamInstanceProfile", None)
    return config


def test_launcher_s3_has_no_shared_filesystem():
    """The object-storage launcher mounts nothing shared, passes the AWS region, gives workers an instance profile."""
    config = _load(LAUNCHER_S3)
    assert config["initialization_commands"] == []
    data = yaml.safe_dump(config)  # the values, not the comments
    assert SHARED_MOUNT not in data and "nfs" not in data.lower() and "efs" not in data.lower()
    run_options = config["docker"]["run_options"]
    assert not [o for o in run_options if o.startswith(("--volume", "--mount", "-v "))]
    assert re.search(r"--env AWS_REGION=[a-z]+-[a-z]+-\d", " ".join(run_options))
    assert re.search(r"--env MLFLOW_TRACKING_URI=http\S+", " ".join(run_options))
    for name in LAUNCHER_GROUP.values():
        profile = config["available_node_types"][name]["node_config"]["IamInstanceProfile"]
        assert profile.get("Name") or profile.get("Arn"), name
    assert config["cluster_name"] != _load(LAUNCHER)["cluster_name"]  # both can run side by side


def test_launcher_s3_is_the_shared_launcher_otherwise():
    """Besides storage, the object-storage launcher equals the shared one: pools, images, setup, start commands."""
    assert _without_storage(_load(LAUNCHER_S3)) == _without_storage(_load(LAUNCHER))


# ---------------------------------------------------------------------------------------------
# KubeRay


@pytest.mark.parametrize(
    "path,kind",
    [(RAYCLUSTER, "RayCluster"), (RAYJOB, "RayJob"), (RAYCLUSTER_S3, "RayCluster"), (RAYJOB_S3, "RayJob")],
    ids=lambda x: x.name if isinstance(x, Path) else x,
)
def test_kuberay_manifest_header(path, kind):
    """Both manifests are ray.io/v1 objects of their kind, with a name."""
    doc = _load(path)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == kind
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])


@pytest.mark.parametrize("which", ALL_SPECS)
def test_kuberay_required_fields(which):
    """Head and worker groups have the fields KubeRay requires, with replicas within bounds."""
    spec = _cluster_specs()[which]
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["rayStartParams"].get("num-cpus") == "0"  # nothing scheduled on the head
    assert head["template"]["spec"]["containers"][0]["image"]
    assert spec["enableInTreeAutoscaling"] is True
    names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    assert sorted(names) == sorted(KUBERAY_GROUP.values()) and len(set(names)) == len(names)
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        assert group["maxReplicas"] > 0
        assert isinstance(group["rayStartParams"], dict)
        assert group["template"]["spec"]["containers"][0]["image"]
    for container in _containers(spec):
        limits = container["resources"]["limits"]
        assert "cpu" in limits and "memory" in limits, container["name"]


@pytest.mark.parametrize("which", ALL_SPECS)
def test_kuberay_passes_ray_autoscaler_translation(which):
    """Ray's KubeRay autoscaler reads the cluster: head CPU 0, one pool unit per CPU / GPU."""
    config = _derive_autoscaling_config(_cluster_specs()[which], name="vlm")
    types = config["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0
    for pool, counted in POOLS.items():
        resources = types[KUBERAY_GROUP[pool]]["resources"]
        assert resources[pool] == resources[counted] > 0, (pool, resources)
    assert "GPU" not in types["cpu-pool"]["resources"]


@pytest.mark.parametrize("which", ALL_SPECS)
def test_kuberay_images_match_installed_ray(which):
    """Every Ray container image and rayVersion match the installed Ray's major.minor; the GPU group runs -gpu."""
    spec = _cluster_specs()[which]
    major, minor = _ray_major_minor()
    assert tuple(int(x) for x in spec["rayVersion"].split(".")[:2]) == (major, minor)
    for container in _containers(spec):
        assert _image_major_minor(container["image"]) == (major, minor), container["image"]
    gpu = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == KUBERAY_GROUP["gpu_pool"])
    assert gpu["template"]["spec"]["containers"][0]["image"].endswith("-gpu")


@pytest.mark.parametrize("which", ALL_SPECS)
def test_kuberay_gpu_group_requests_gpus(which):
    """The GPU group requests nvidia.com/gpu (limits = requests); no other group does."""
    for group in _cluster_specs()[which]["workerGroupSpecs"]:
        resources = group["template"]["spec"]["containers"][0]["resources"]
        if group["groupName"] == KUBERAY_GROUP["gpu_pool"]:
            assert int(resources["limits"]["nvidia.com/gpu"]) > 0
            assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
        else:
            assert "nvidia.com/gpu" not in resources.get("limits", {})


@pytest.mark.parametrize("which", ["raycluster", "rayjob"])
def test_kuberay_token_auth_mlflow_and_shared_storage(which):
    """Token auth is on, every Ray container has MLFLOW_TRACKING_URI and the shared RWX volume."""
    spec = _cluster_specs()[which]
    assert spec["authOptions"]["mode"] == "token"
    pvc = _load(STORAGE)
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    for group in _groups(spec):
        pod = group["template"]["spec"]
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
        }
        for container in pod["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("MLFLOW_TRACKING_URI"), container["name"]
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert claims.get(mounts.get(SHARED_MOUNT)) == pvc["metadata"]["name"], container["name"]


@pytest.mark.parametrize("job,cluster", [(RAYJOB, RAYCLUSTER), (RAYJOB_S3, RAYCLUSTER_S3)], ids=["shared", "s3"])
def test_rayjob_fields(job, cluster):
    """The RayJob has an entrypoint, a cluster of the RayCluster's shape, and cleans up after itself."""
    spec = _load(job)["spec"]
    assert spec["entrypoint"].strip()
    assert "rayClusterSpec" in spec or "clusterSelector" in spec
    assert spec["rayClusterSpec"] == _load(cluster)["spec"], f"{job.name}'s rayClusterSpec drifted from {cluster.name}"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("which", ["raycluster-s3", "rayjob-s3"])
def test_kuberay_s3_has_no_shared_volume_and_the_aws_env(which):
    """No PVC, hostPath or NFS volume in any pod; every Ray container has MLflow, the AWS region and the
    credentials / endpoint from one Secret, each key optional (an IAM role works without it)."""
    spec = _cluster_specs()[which]
    assert spec["authOptions"]["mode"] == "token"
    secrets = set()
    for group in _groups(spec):
        pod = group["template"]["spec"]
        assert all(set(v) == {"name", "emptyDir"} for v in pod.get("volumes", [])), pod["volumes"]
        for container in pod["containers"]:
            assert SHARED_MOUNT not in {m["mountPath"] for m in container.get("volumeMounts", [])}
            env = _env(container)
            assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http"), container["name"]
            assert re.fullmatch(r"[a-z]+-[a-z]+-\d", env["AWS_REGION"]["value"]), container["name"]
            for var in AWS_SECRET_VARS:
                ref = env[var]["valueFrom"]["secretKeyRef"]
                assert ref["key"] == var and ref["optional"] is True, (container["name"], var)
                secrets.add(ref["name"])
    assert len(secrets) == 1, secrets
    # KubeRay keeps the cluster's Ray token in a Secret named after the cluster: never the same one
    assert secrets.isdisjoint({_load(RAYCLUSTER_S3)["metadata"]["name"], _load(RAYJOB_S3)["metadata"]["name"]})


def _kuberay_without_storage(spec: dict) -> dict:
    """A RayCluster spec less what the storage choice changes: the shared volume, its mounts, the AWS env."""
    spec = copy.deepcopy(spec)
    for group in _groups(spec):
        pod = group["template"]["spec"]
        shared = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        pod["volumes"] = [v for v in pod["volumes"] if v["name"] not in shared]
        for container in pod["containers"]:
            container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] not in shared]
            container["env"] = [e for e in container["env"] if not e["name"].startswith("AWS_")]
    return spec


def test_kuberay_s3_is_the_shared_cluster_otherwise():
    """Besides storage, raycluster-s3.yaml equals raycluster.yaml: groups, images, resources, start params."""
    assert _kuberay_without_storage(_load(RAYCLUSTER_S3)["spec"]) == _kuberay_without_storage(_load(RAYCLUSTER)["spec"])


def _paths(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv[:-1]) if word in ("--input", "--output", "--data")]


def test_rayjob_s3_runs_the_shared_pipeline_on_a_bucket():
    """The object-storage RayJob runs the shared RayJob's commands with every input and output an s3:// URL."""
    shared = _vlm_commands(_load(RAYJOB)["spec"]["entrypoint"])
    on_s3 = _vlm_commands(_load(RAYJOB_S3)["spec"]["entrypoint"])
    paths = [p for argv in on_s3 for p in _paths(argv)]
    assert len(paths) == 4 and all(p.startswith("s3://") for p in paths), paths
    assert SHARED_MOUNT not in _load(RAYJOB_S3)["spec"]["entrypoint"]
    strip = lambda argv: [w for w in argv if w not in _paths(argv)]
    assert [strip(c) for c in on_s3] == [strip(c) for c in shared]
    assert _runtime_env_of_job(RAYJOB_S3) == _runtime_env_of_job(RAYJOB)


def test_mlflow_server_manifest_proxies_artifacts_to_s3():
    """mlflow-s3.yaml: a tracking server at the manifests' MLFLOW_TRACKING_URI, artifacts to s3://, the
    installed MLflow's version, a Host check (MLflow's own) that admits that address, the AWS env."""
    from urllib.parse import urlparse

    import mlflow
    from mlflow.server.security_utils import is_allowed_host_header

    docs = {d["kind"]: d for d in yaml.safe_load_all(MLFLOW_S3.read_text())}
    deployment, service = docs["Deployment"], docs["Service"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    script = " ".join(container["args"])
    env = _env(container)
    assert "mlflow server" in script and '--artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"' in script
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith("s3://")
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["key"]
    for var in AWS_SECRET_VARS:
        assert env[var]["valueFrom"]["secretKeyRef"]["optional"] is True, var
    assert "boto3" in script  # the S3 artifact store needs it; the stock image lacks it
    tag = container["image"].rsplit(":v", 1)[1]
    assert tag.split(".")[:2] == mlflow.__version__.split(".")[:2], container["image"]
    # the address every Ray container uses
    uris = {_env(c)["MLFLOW_TRACKING_URI"]["value"] for c in _containers(_load(RAYCLUSTER_S3)["spec"])}
    uris.add(_runtime_env_of_job(RAYJOB_S3)["env_vars"]["MLFLOW_TRACKING_URI"])
    (uri,) = uris
    url = urlparse(uri)
    meta = service["metadata"]
    assert url.hostname == f"{meta['name']}.{meta['namespace']}.svc.cluster.local"
    assert meta["namespace"] == deployment["metadata"]["namespace"]
    port = service["spec"]["ports"][0]
    assert url.port == port["port"] and "--port 5000" in script and port["targetPort"] == "http"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    allowed = re.search(r"--allowed-hosts '([^']+)'", script).group(1).split(",")
    assert is_allowed_host_header(allowed, url.netloc)
    assert not is_allowed_host_header(allowed, "attacker.example:5000")
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"


def test_rayjob_runtime_env():
    """The RayJob's runtime env is a valid Ray runtime env: runtime-env.yaml plus a remote working_dir."""
    from ray.runtime_env import RuntimeEnv

    env = _runtime_env_of_job()
    assert set(env) <= _runtime_env_fields()
    RuntimeEnv(**env)
    assert re.fullmatch(r"(https?|s3|gs)://\S+\.zip", env["working_dir"]), env["working_dir"]
    assert env["env_vars"].get("MLFLOW_TRACKING_URI")
    shared = _load(RUNTIME_ENV)
    assert env["pip"] == shared["pip"]
    assert {k: v for k, v in env["env_vars"].items() if k != "MLFLOW_TRACKING_URI"} == shared["env_vars"]


def test_runtime_env_file_through_ray_cli():
    """runtime-env.yaml loads as `ray job submit --runtime-env` does, pins torch as pyproject, installs the project."""
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv

    env = parse_runtime_env_args(runtime_env=str(RUNTIME_ENV), working_dir=str(ROOT))
    assert set(env) <= _runtime_env_fields()
    runtime_env = RuntimeEnv(**env)
    packages = runtime_env.pip_config()["packages"]
    assert packages[:2] == [f"torch=={_pinned('torch')}", f"torchvision=={_pinned('torchvision')}"]
    # the project itself, from the job's working_dir (its dependencies and the `vlm` command)
    assert "${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}" in packages


# ---------------------------------------------------------------------------------------------
# launcher and KubeRay agree


def test_same_pools_in_launcher_and_kuberay():
    """Launcher and KubeRay declare the same custom resources, pool bounds and GPUs per node."""
    launcher = _load(LAUNCHER)["available_node_types"]
    kuberay = _derive_autoscaling_config(_cluster_specs()["raycluster"], name="vlm")["available_node_types"]
    custom = lambda types: {r for t in types.values() for r in t["resources"] if r not in ("CPU", "GPU", "memory")}
    assert custom(launcher) == custom(kuberay) == set(POOLS)
    for pool in POOLS:
        node, group = launcher[LAUNCHER_GROUP[pool]], kuberay[KUBERAY_GROUP[pool]]
        assert (node["min_workers"], node["max_workers"]) == (group["min_workers"], group["max_workers"]), pool
    assert launcher["gpu_worker"]["resources"]["GPU"] == kuberay["gpu-pool"]["resources"]["GPU"]


def test_documented_vlm_commands_parse():
    """The `vlm` commands of the RayJob and the cluster guide parse with the real CLI and config schema."""
    commands = _vlm_commands(_load(RAYJOB)["spec"]["entrypoint"])
    assert [c[:2] for c in commands] == [["ingest", "--input"], ["train", "clip"]]
    commands += _vlm_commands(_load(RAYJOB_S3)["spec"]["entrypoint"])
    readme = (CLUSTER / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    commands += [c for block in blocks for c in _vlm_commands(block)]
    assert len(commands) > 2
    for argv in commands:
        _check_vlm_command(argv)
